"""Hugging Face interop (cllm_gpu/hf.py): `export` loads in transformers' GPT2LMHeadModel with
our logits; `train --init-from` reads a GPT-2 directory (GPT-2's 50,257 vocabulary padded to
50,304), checks it and says what does not fit. The transformers tests are required in CI
(.ci/run installs the local CPU torch wheel; transformers comes with the dev extra)."""
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from cllm_gpu import CLLMModel, GpuTrainer, ModelConfig, TrainConfig
from cllm_gpu import checkpoint as ckpt
from cllm_gpu import hf, safetensors_io
from cllm_gpu.data import ByteTokenizer, TokenDataset, load_tokenizer
from cllm_gpu.data import prepare as prepare_data
from cllm_gpu.errors import CheckpointError, CLLMError, ConfigError, DataError
from cllm_gpu.model import init_params
from clihelp import assert_one_line_error, run_cli
from lockrace import RacingThread

# a skip for want of a package the dev extra installs (tokenizers) fails CI: tests/conftest.py
pytestmark = pytest.mark.ci_required("dev")

TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=16)
QUIET = dict(log=lambda *a: None)


def _word_tokenizer_json(n: int, marker: str = "t") -> str:
    """A real tokenizer.json of n tokens (word-level: "t0" .. "t{n-1}"), small enough for a
    vocabulary of 10: export loads the data's tokenizer as sample does."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"{marker}{i}": i for i in range(n)}
    return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=f"{marker}0")).to_str()


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def transformers(torch):
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def byte_data(token_dir):
    return token_dir("the quick brown fox jumps over the lazy dog. " * 100, "hfdata")


def _our_logits(run, idx):
    ck_dir, state, _ = ckpt.find_resumable(run)
    model = CLLMModel(ModelConfig.from_dict(state["model_config"]), backend="numpy")
    model.load_state_dict(ckpt.load_model_params(ck_dir, model.specs, state))
    return model.logits(idx)


def _hf_logits(torch, model, idx):
    with torch.no_grad():
        return model(torch.as_tensor(idx)).logits.numpy()


@pytest.mark.ci_required("torch")
def test_export_loads_in_transformers_with_our_logits(transformers, torch, byte_data, tmp_path):
    """A trained, padded (257 -> 320) byte-level run: exported unpadded; GPT2LMHeadModel's
    logits equal ours within float32 rounding; the exported tokenizer is the byte tokenizer
    (end-of-text 256) and generate() runs."""
    cfg = ModelConfig(vocab_size=257, padded_vocab_size=320, **TINY)
    tc = TrainConfig(batch_size=2, max_steps=3, eval_interval=0, learning_rate=1e-2)
    GpuTrainer(cfg, tc, byte_data, tmp_path / "run", backend="numpy", **QUIET).train()
    # over a directory that held another GPT-2 (transformers' generation_config.json, eos
    # 50256): it was left in place and generate() never stopped at the run's end-of-text
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": 50256}')
    r = run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout and "tokenizer: byte" in r.stdout
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["vocab_size"] == 257 and conf["eos_token_id"] == 256
    tensors, meta = safetensors_io.load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["transformer.wte.weight"].shape == (257, 16) and meta["format"] == "pt"

    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    idx = np.random.default_rng(0).integers(0, 257, size=(3, 16))
    ours, theirs = _our_logits(tmp_path / "run", idx), _hf_logits(torch, model, idx)
    assert theirs.shape == ours.shape == (3, 16, 257)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "héllo, wörld\n\t~ <|endoftext|>"
    ids = tok(text).input_ids
    # the byte tokenizer's own prompt encoding: it spelled <|endoftext|> as 13 bytes
    ours_ids = ByteTokenizer().encode(text).tolist()
    assert ids == ours_ids and ids[-1] == 256
    assert tok.eos_token_id == 256 == model.generation_config.eos_token_id
    assert tok.bos_token_id == 256 == model.generation_config.bos_token_id  # GPT-2's
    assert tok.decode(ids) == text
    out = model.generate(torch.as_tensor([ids[:5]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with GPT-2's own vocabulary size, as transformers saves it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_embd=16, n_layer=2,
                                   n_head=2)
    model = transformers.GPT2LMHeadModel(conf)
    with torch.no_grad():  # off the init (unit gains, zero biases): every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(d)
    return d


@pytest.mark.ci_required("torch")
def test_init_from_gpt2_pads_the_vocabulary_and_round_trips(transformers, torch, gpt2_dir,
                                                            byte_data, tmp_path):
    """train --init-from a GPT-2 directory: vocabulary 50,257 padded to 50,304 (zero rows),
    the logits are transformers', training runs on the padded model, and an export gives back
    the same tensors (padding dropped)."""
    r = run_cli("train", "--init-from", gpt2_dir, "--data", byte_data, "--out", tmp_path / "run",
                "--max-steps", 0, "--sample-tokens", 0, "--backend", "numpy", "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    assert "vocabulary 50,257 padded to 50,304" in r.stdout
    assert "vocab 50257 (padded to 50304)" in r.stdout
    ck_dir, state, _ = ckpt.find_resumable(tmp_path / "run")
    assert state["model_config"]["padded_vocab_size"] == 50304
    assert state["init_from"] == str(gpt2_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    idx = np.random.default_rng(1).integers(0, 50257, size=(2, 16))
    ours, theirs = _our_logits(tmp_path / "run", idx), _hf_logits(torch, model, idx)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())

    r = run_cli("export", tmp_path / "run", "--hf", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    orig, _ = safetensors_io.load_file(gpt2_dir / "model.safetensors")
    back, _ = safetensors_io.load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == {n for n in orig if not re.search(r"\.attn\.(bias|masked_bias)$", n)}
    for n in back:
        np.testing.assert_array_equal(back[n], orig[n], err_msg=n)

    cfg = hf.gpt2_model_config(gpt2_dir)
    tc = TrainConfig(batch_size=2, max_steps=2, eval_interval=1, eval_batches=1)
    tr = GpuTrainer(None, tc, byte_data, tmp_path / "ft", backend="numpy", init_from=gpt2_dir,
                    **QUIET)
    assert tr.model_cfg == cfg and cfg.padded_vocab_size == 50304
    summary = tr.train()
    assert np.isfinite(summary["losses"]).all() and len(summary["losses"]) == 2
    wte = tr.model.params["transformer.wte.weight"]
    assert not wte[50257:].any()  # padding: no gradient, no decay of a zero, stays zero


def _transformers_gpt2(d, torch, transformers, dtype=None, vocab_size=100, **config):
    """A tiny GPT2LMHeadModel (vocabulary 100) off its init, saved to d; returned in eval mode."""
    torch.manual_seed(0)
    conf = transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=16, n_layer=2,
                                   n_head=2, bos_token_id=vocab_size - 1,
                                   eos_token_id=vocab_size - 1, **config)
    model = transformers.GPT2LMHeadModel(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(d)
    return model.float().eval()


@pytest.mark.ci_required("torch")
@pytest.mark.parametrize("dtype,config", [
    ("float16", {}), ("bfloat16", {}),
    (None, {"activation_function": "gelu_python_tanh"}),
    (None, {"activation_function": "gelu_accurate"}),
    (None, {"reorder_and_upcast_attn": True, "n_inner": 64})])
def test_init_from_gives_transformers_logits(transformers, torch, tmp_path, dtype, config):
    """GPT-2s that compute cllm-gpu's function, saved by transformers: weights in fp16 or bf16
    (save_pretrained keeps the model's dtype), the tanh GELU under its other names, the
    float32 no-ops. bf16 was refused ("unsupported dtype 'BF16'"), and so were
    gelu_python_tanh and gelu_accurate (both are 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))))."""
    from transformers.activations import ACT2FN
    act = config.get("activation_function", "gelu_new")
    if act not in ACT2FN:  # gelu_python_tanh: not in transformers 4.40 (the dev extra's bound)
        pytest.skip(f"transformers {transformers.__version__} has no {act!r} activation")
    model = _transformers_gpt2(tmp_path / "g", torch, transformers, dtype=dtype, **config)
    cfg = hf.gpt2_model_config(tmp_path / "g")
    ours = CLLMModel(cfg, backend="numpy", dtype="float64")
    ours.load_state_dict(hf.load_gpt2_state_dict(tmp_path / "g", cfg))
    idx = np.random.default_rng(0).integers(0, 100, size=(2, 16))
    theirs = _hf_logits(torch, model, idx)
    np.testing.assert_allclose(ours.logits(idx)[..., :100], theirs, rtol=1e-5,
                               atol=1e-5 * np.abs(theirs).max())


@pytest.mark.ci_required("torch")
def test_init_from_reads_sharded_weights_as_the_single_file(transformers, torch, tmp_path,
                                                             byte_data):
    """transformers' save_pretrained(max_shard_size=...) writes model.safetensors.index.json
    and model-0000k-of-0000n.safetensors: it was refused ("sharded files ... are not read").
    The shards give exactly the single file's parameters, and the model transformers' logits."""
    model = _transformers_gpt2(tmp_path / "one", torch, transformers, vocab_size=300)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    cfg = hf.gpt2_model_config(tmp_path / "sharded")
    assert cfg == hf.gpt2_model_config(tmp_path / "one")
    one = hf.load_gpt2_state_dict(tmp_path / "one", cfg)
    sharded = hf.load_gpt2_state_dict(tmp_path / "sharded", cfg)
    assert set(sharded) == set(one)
    for n in one:
        np.testing.assert_array_equal(sharded[n], one[n], err_msg=n)
    ours = CLLMModel(cfg, backend="numpy", dtype="float64")
    ours.load_state_dict(sharded)
    idx = np.random.default_rng(0).integers(0, 300, size=(2, 16))
    theirs = _hf_logits(torch, model, idx)
    np.testing.assert_allclose(ours.logits(idx)[..., :300], theirs, rtol=1e-5,
                               atol=1e-5 * np.abs(theirs).max())
    tr = GpuTrainer(None, TrainConfig(batch_size=2), byte_data, tmp_path / "run",
                    backend="numpy", init_from=tmp_path / "sharded", **QUIET)
    for n in one:
        np.testing.assert_array_equal(tr.model.params[n], one[n].astype(np.float32), err_msg=n)


def _shard_dir(src, dst, edit_index=None, edit_shards=None):
    """A copy of the sharded GPT-2 directory src with its index and shards edited."""
    import shutil
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    if edit_shards:
        shards = {p.name: safetensors_io.load_file(p)[0] for p in dst.glob("model-*")}
        edit_shards(shards)
        for p in dst.glob("model-*"):
            p.unlink()
        for name, tensors in shards.items():
            safetensors_io.save_file(tensors, dst / name, metadata={"format": "pt"})
    if edit_index:
        edit_index(index["weight_map"])
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.ci_required("torch")
def test_init_from_refuses_shards_that_disagree_with_their_index(transformers, torch, tmp_path,
                                                                 byte_data):
    """Every way an index and its shards can disagree is one line naming the file and the
    tensor: a shard missing, a tensor the index lists in a shard that does not hold it, a
    tensor in two shards, a shard tensor the index does not list or lists elsewhere, a shard
    named outside the directory, a tensor listed twice in the JSON (json keeps the last)."""
    model = _transformers_gpt2(tmp_path / "one", torch, transformers, vocab_size=300)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="10KB")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    # a shard of several tensors: moving one out of the index leaves it still read
    first = next(f for f in files if list(weight_map.values()).count(f) > 1)
    second = next(f for f in files if f != first)
    in_first = sorted(n for n, f in weight_map.items() if f == first)
    moved = in_first[0]

    def drop_first_shard(shards):
        del shards[first]

    def drop_a_tensor(shards):
        del shards[first][moved]

    def copy_into_second(shards):
        shards[second][moved] = shards[first][moved]

    def add_unlisted(shards):
        shards[first]["transformer.h.0.extra"] = np.zeros(3, np.float32)

    def relist(where):
        return lambda m: m.update({moved: where})

    cases = [
        (dict(edit_shards=drop_first_shard),
         rf"{first}: not found \(model\.safetensors\.index\.json lists it for "
         rf"{len(in_first)} tensor\(s\), e\.g\. {re.escape(in_first[0])}\)"),
        (dict(edit_shards=drop_a_tensor),
         rf"model\.safetensors\.index\.json: lists {re.escape(moved)} in {first}, which does "
         rf"not hold it"),
        (dict(edit_shards=copy_into_second),
         rf"index\.json: {re.escape(moved)} is in both "
         rf"{' and '.join(sorted((first, second)))}"),
        (dict(edit_shards=add_unlisted),
         rf"{first}: holds transformer\.h\.0\.extra, but the index does not list it"),
        (dict(edit_index=relist(second)),
         rf"{first}: holds {re.escape(moved)}, but the index lists it in {second}"),
        (dict(edit_index=relist("../one/model.safetensors")),
         rf"{re.escape(moved)} is in '\.\./one/model\.safetensors', not a file name in"),
        (dict(edit_index=lambda m: m.clear()), r"expected an object with a \"weight_map\""),
    ]
    for i, (kw, pattern) in enumerate(cases):
        d = _shard_dir(src, tmp_path / f"d{i}", **kw)
        with pytest.raises(CheckpointError, match=pattern):
            hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))
    d = _shard_dir(src, tmp_path / "twice")
    text = (d / "model.safetensors.index.json").read_text()
    key = f'"{moved}": "{first}"'
    assert key in text
    (d / "model.safetensors.index.json").write_text(
        text.replace(key, f'"{moved}": "{second}", {key}'))
    with pytest.raises(CheckpointError, match=rf"index\.json: duplicate key "
                                              rf"'{re.escape(moved)}'$"):
        hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))
    # a tensor mis-shaped in a shard: the line names the shard holding it
    d = _shard_dir(src, tmp_path / "shape", edit_shards=lambda s: s[first].update(
        {moved: np.zeros(5, np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{first}: {re.escape(moved)} has shape \(5,\)"):
        hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))
    # through the command line: one line, and no run directory
    d = _shard_dir(src, tmp_path / "cli", edit_shards=drop_first_shard)
    assert_one_line_error(run_cli("train", "--init-from", d, "--data", byte_data, "--out",
                                  tmp_path / "o", "--backend", "numpy"),
                          rf"{first}: not found \(model\.safetensors\.index\.json lists it")
    assert not (tmp_path / "o").exists()


def _write_gpt2_dir(d, cfg, prefix="transformer.", drop=(), change=None, config=None):
    """A GPT-2 directory written without transformers: our init, GPT-2's names."""
    d.mkdir()
    sd = {prefix + n[len("transformer."):]: a.astype(np.float32)
          for n, a in init_params(cfg, 0).items() if n not in drop}
    sd.update(change or {})
    safetensors_io.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({**hf.gpt2_config(cfg), **(config or {})}))
    return d


def test_init_from_reads_gpt2_names_with_and_without_prefix(tmp_path):
    """GPT2LMHeadModel names (transformer.*, a tied lm_head) and the original GPT-2 files'
    GPT2Model names (no prefix, causal-mask buffers) give the same parameters."""
    cfg = ModelConfig(vocab_size=100, **TINY)
    want = init_params(cfg, 0)
    mask = np.tril(np.ones((1, 1, 16, 16), dtype=np.float32))
    a = _write_gpt2_dir(tmp_path / "a", cfg, change={
        "lm_head.weight": want["transformer.wte.weight"].astype(np.float32)})
    b = _write_gpt2_dir(tmp_path / "b", cfg, prefix="", change={
        "h.0.attn.bias": mask, "h.1.attn.bias": mask, "h.0.attn.masked_bias": mask[0, 0, 0]})
    for d in (a, b):
        got_cfg = hf.gpt2_model_config(d)
        assert got_cfg.padded_vocab_size == 128 and got_cfg.vocab_size == 100
        sd = hf.load_gpt2_state_dict(d, got_cfg)
        assert sd["transformer.wte.weight"].shape == (128, 16)
        assert not sd["transformer.wte.weight"][100:].any()
        for n, v in want.items():
            np.testing.assert_allclose(sd[n][:100] if "wte" in n else sd[n],
                                       v.astype(np.float32), err_msg=n)
    assert hf.gpt2_model_config(a, padded_vocab_size=100).padded_vocab_size == 100


def test_init_from_says_what_does_not_fit(tmp_path, byte_data):
    cfg = ModelConfig(vocab_size=300, **TINY)
    cases = [
        (dict(drop=("transformer.h.1.mlp.c_fc.weight",)),
         r"missing tensor transformer\.h\.1\.mlp\.c_fc\.weight"),
        (dict(change={"transformer.h.0.attn.c_attn.bias": np.zeros(47, np.float32)}),
         r"transformer\.h\.0\.attn\.c_attn\.bias has shape \(47,\), config\.json implies \(48,\)"),
        (dict(change={"transformer.h.2.ln_1.weight": np.ones(16, np.float32)}),
         r"unexpected tensor transformer\.h\.2\.ln_1\.weight"),
        (dict(change={"lm_head.weight": np.ones((300, 16), np.float32)}),
         r"lm_head\.weight differs from transformer\.wte\.weight"),
        (dict(config={"activation_function": "gelu"}),
         r"activation_function = 'gelu' is not supported \(cllm-gpu's GELU is the tanh"),
        (dict(config={"layer_norm_epsilon": 1e-6}), r"layer_norm_epsilon = 1e-06 is not supported"),
        (dict(config={"model_type": "llama"}), r"model_type 'llama' is not GPT-2"),
        # JSON of the wrong type: a line naming the key (they were Python tracebacks)
        (dict(config={"vocab_size": "300"}), r"vocab_size must be an integer, got '300'"),
        (dict(config={"n_layer": 2.5}), r"n_layer must be an integer, got 2\.5"),
        (dict(config={"layer_norm_epsilon": "x"}),
         r"layer_norm_epsilon must be a number, got 'x'"),
        # tensors named as in the file (a classifier's head, GPT2Model names), not as mapped
        (dict(change={"score.weight": np.ones((2, 16), np.float32)}),
         r"unexpected tensor score\.weight \(not a GPT-2 parameter"),
        (dict(prefix="", change={"h.0.attn.c_attn.bias": np.zeros(47, np.float32)}),
         r": h\.0\.attn\.c_attn\.bias has shape \(47,\)"),
        # one parameter with and without the prefix: one of them was read, silently
        (dict(change={"ln_f.weight": np.zeros(16, np.float32)}),
         r"ln_f\.weight and transformer\.ln_f\.weight are both transformer\.ln_f\.weight"),
        # a weight of integers (or booleans) of the right shape: it loaded as its integers,
        # silently (a checkpoint's is refused: checkpoint._match); the int8 is GPT-2's own
        # ones, which loaded as 1.0 exactly, so only the type says it is no weight
        (dict(change={"transformer.h.0.ln_1.weight": np.ones(16, np.int8)}),
         r"transformer\.h\.0\.ln_1\.weight is int8, not a float type: not a weight"),
        (dict(change={"transformer.ln_f.bias": np.zeros(16, np.bool_)}),
         r"transformer\.ln_f\.bias is bool, not a float type"),
    ]
    for i, (kw, pattern) in enumerate(cases):
        d = _write_gpt2_dir(tmp_path / f"d{i}", cfg, **kw)
        with pytest.raises((ConfigError, CheckpointError), match=pattern):
            GpuTrainer(None, TrainConfig(), byte_data, tmp_path / f"r{i}", backend="numpy",
                       init_from=d, **QUIET)
        assert not (tmp_path / f"r{i}").exists()  # refused before the run directory is made
    d = _write_gpt2_dir(tmp_path / "cut", cfg)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CLLMError, match="model.safetensors"):
        GpuTrainer(None, TrainConfig(), byte_data, tmp_path / "r_cut", backend="numpy",
                   init_from=d, **QUIET)
    assert not (tmp_path / "r_cut").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf.gpt2_config(cfg)))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    # through the command line: one line, nothing unpickled
    assert_one_line_error(run_cli("train", "--init-from", tmp_path / "bin", "--data", byte_data,
                                  "--out", tmp_path / "o", "--backend", "numpy"),
                          r"model\.safetensors: not found, nor model\.safetensors\.index\.json; "
                          r"found pytorch_model\.bin: pickle \(\.bin\) files are not read")
    assert_one_line_error(run_cli("train", "--init-from", tmp_path / "none", "--data", byte_data,
                                  "--out", tmp_path / "o", "--backend", "numpy"),
                          r"config\.json: not found \(--init-from needs a Hugging Face GPT-2")
    d = _write_gpt2_dir(tmp_path / "ok", cfg)
    with pytest.raises(ConfigError, match="exclude each other"):
        GpuTrainer(None, TrainConfig(), byte_data, tmp_path / "x", backend="numpy",
                   init_from=d, resume=tmp_path / "x", **QUIET)
    with pytest.raises(ConfigError, match=r"n_layer is 2 there, the model config says 3"):
        GpuTrainer(ModelConfig(vocab_size=300, block_size=16, n_layer=3, n_head=2, n_embd=16),
                   TrainConfig(), byte_data, tmp_path / "y", backend="numpy", init_from=d, **QUIET)


def test_init_from_notes_each_model_flag_it_ignores(tmp_path, byte_data):
    """--init-from takes the directory's model: a model flag given with another value (an
    attention bias included) gets a note; they were dropped without a word. --dropout and
    --padded-vocab-size are the run's own and honoured."""
    d = _write_gpt2_dir(tmp_path / "g", ModelConfig(vocab_size=300, **TINY))
    r = run_cli("train", "--init-from", d, "--data", byte_data, "--out", tmp_path / "o",
                "--backend", "numpy", "--max-steps", 0, "--sample-tokens", 0, "--n-layer", 5,
                "--n-head", 2, "--attn-bias", "lattice", "--dropout", 0.1,
                "--padded-vocab-size", 320)
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("note:")] == [
        f"note: --n-layer 5 ignored on --init-from: {d}'s GPT-2 has n_layer 2",
        f"note: --attn-bias lattice ignored on --init-from: {d}'s GPT-2 has attn_bias none"]
    state = ckpt.find_resumable(tmp_path / "o").state["model_config"]
    assert (state["n_layer"], state["attn_bias"], state["dropout"], state["padded_vocab_size"]) \
        == (2, "none", 0.1, 320)


def test_init_from_refusals_name_the_flag(tmp_path, byte_data):
    """--padded-vocab-size and --seq-len against the directory's config.json: the flag given
    and the directory's value, named (they said padded_vocab_size, seq_len and block_size)."""
    d = _write_gpt2_dir(tmp_path / "g", ModelConfig(vocab_size=300, **TINY))
    for flags, pattern in (
            (["--padded-vocab-size", 100], rf"^error: {re.escape(str(d / 'config.json'))}: "
                                           r"--padded-vocab-size \(100\) must be >= vocab_size "
                                           r"\(300\)$"),
            (["--seq-len", 32, "--block-size", 64],
             r"^error: --seq-len \(32\) must be <= block_size \(16\) \(block_size 16 is "
             rf"{re.escape(str(d / 'config.json'))}'s; --block-size 64 is ignored on "
             r"--init-from\)$"),
            (["--dropout", 1], r"^error: --dropout must be < 1\.0, got 1\.0$")):
        assert_one_line_error(run_cli("train", "--init-from", d, "--data", byte_data, "--out",
                                      tmp_path / "o", "--backend", "numpy", *flags), pattern)
    assert not (tmp_path / "o").exists()


def test_init_from_refuses_data_prepared_with_another_tokenizer(tmp_path, byte_data):
    """The directory's tokenizer.json against the data's tokenizer, token by token: byte-level
    data under a BPE GPT-2 trained silently on ids that meant other tokens; a re-saved copy of
    the data's own tokenizer passes, and so does a directory without tokenizer.json."""
    pytest.importorskip("tokenizers")
    cfg = ModelConfig(vocab_size=300, **TINY)
    meta = json.loads((byte_data / "meta.json").read_text())
    bpe = _write_gpt2_dir(tmp_path / "bpe", cfg)
    (bpe / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(300)}, "merges": []},
         "added_tokens": [{"id": 299, "content": "<|endoftext|>"}]}))
    assert_one_line_error(run_cli("train", "--init-from", bpe, "--data", byte_data, "--out",
                                  tmp_path / "o", "--backend", "numpy"),
                          rf"{byte_data} was prepared with another tokenizer \(byte, vocab 257\) "
                          rf"than {bpe}/tokenizer\.json: the weights' token ids would stand for "
                          rf"other tokens; prepare the data with `cllm-gpu prepare \.\.\. "
                          rf"--tokenizer {bpe}/tokenizer\.json`")
    assert not list((tmp_path / "o").glob("ckpt-*"))
    same = _write_gpt2_dir(tmp_path / "same", cfg)
    byte_json = json.loads(ByteTokenizer(meta.get("eot_id")).to_hf_json())
    (same / "tokenizer.json").write_text(json.dumps(byte_json, indent=1, sort_keys=True))
    GpuTrainer(None, TrainConfig(), byte_data, tmp_path / "a", backend="numpy", init_from=same,
               **QUIET)
    (same / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer\.json: not valid JSON \(Expecting"):
        GpuTrainer(None, TrainConfig(), byte_data, tmp_path / "b", backend="numpy",
                   init_from=same, **QUIET)
    (same / "tokenizer.json").write_text('{"model": {}}')  # JSON, but no vocabulary
    with pytest.raises(ConfigError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json "
                                          r"\(KeyError: 'vocab'\)"):
        GpuTrainer(None, TrainConfig(), byte_data, tmp_path / "c", backend="numpy",
                   init_from=same, **QUIET)



def test_init_from_trains_on_the_data_whose_tokenizer_it_checked(tmp_path, byte_data,
                                                                 monkeypatch):
    """--init-from checks the directory's tokenizer against the meta.json of the token files
    it then trains on, one opening: a prepare of another tokenizer landing right after the
    data is opened changes neither (the trainer's data is the byte data it checked). Mutation
    audit: a separate opening for the check (a probe, then the data opened again) passed
    every test, and trained the byte GPT-2 on the BPE's ids."""
    import shutil

    from cllm_gpu import data as data_module
    from cllm_gpu import trainer as trainer_module
    from cllm_gpu.data import tokenizer_identity
    pytest.importorskip("tokenizers")
    data_dir = tmp_path / "tok"
    shutil.copytree(byte_data, data_dir)
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    bpe_data = tmp_path / "bpe"
    prepare_data(tmp_path / "t.txt", bpe_data, tokenizer="bpe", bpe_vocab_size=257)
    byte_identity = tokenizer_identity(json.loads((data_dir / "meta.json").read_text()))
    gpt2 = _write_gpt2_dir(tmp_path / "gpt2", ModelConfig(vocab_size=300, **TINY))
    meta = json.loads((data_dir / "meta.json").read_text())
    (gpt2 / "tokenizer.json").write_text(ByteTokenizer(meta.get("eot_id")).to_hf_json())
    opened = []

    class OpenedThenRePrepared(TokenDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not opened:
                opened.append(self)
                files = {p.name: p.read_bytes() for p in sorted(bpe_data.iterdir())
                         if p.name != "meta.json"}
                data_module.write_files(data_dir, {
                    **files, "meta.json": (bpe_data / "meta.json").read_bytes()})
    monkeypatch.setattr(trainer_module, "TokenDataset", OpenedThenRePrepared)
    trainer = GpuTrainer(None, TrainConfig(), data_dir, tmp_path / "o", backend="numpy",
                         init_from=gpt2, **QUIET)
    assert json.loads((data_dir / "meta.json").read_text())["tokenizer"] == "bpe"  # it landed
    assert trainer.data is opened[0]
    assert tokenizer_identity(trainer.data.meta) == byte_identity


GPT2_CORPUS = ("the quick brown fox jumps over the lazy dog. Ünïcode naïve café 日本語 😀\n\n"
               "  spaces\ttabs 12345 don't we'll ") * 50


def _gpt2_original_files(tokenizers, d):
    """A GPT-2 directory's original tokenizer files, as GPT-2 was released: vocab.json and
    merges.txt of a byte-level BPE (trained offline here), no tokenizer.json."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([GPT2_CORPUS], vocab_size=400, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    d.mkdir(exist_ok=True)
    bpe.save_model(str(d))
    assert {"vocab.json", "merges.txt"} <= {p.name for p in d.iterdir()}
    assert not (d / "tokenizer.json").exists()
    return d


def _openai_gpt2_encode(text, vocab, merges_txt):
    """GPT-2's encoder as OpenAI released it (encoder.py: its pre-tokenizing pattern, its
    byte-to-unicode table, merges by rank), in plain Python: a reference that shares no code
    with the `tokenizers` library."""
    regex = pytest.importorskip("regex")
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = dict(zip(bs, map(chr, cs)))
    ranks = {tuple(m.split()): r for r, m in enumerate(merges_txt.split("\n")[1:-1])}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                        r"""|\s+(?!\S)|\s+""")
    ids = []
    for piece in pat.findall(text):
        word = [byte_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[t] for t in word]
    return ids


GPT2_DOCUMENTS = [
    "the quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ", "a\n\nb\r\n c \n\n\n", "\t tabs\tand\u00a0no-break",
    "don't I'll we've they're 'quoted'", "naïve café Ω 日本語 😀🦙 e\u0301 \u2028line sep",
    "12345 3.14 -7e10 x2", "a page about GPT-2: it ends documents with <|endoftext|> and",
    "<|endoftext|>", "   ", "\n", "ZZZ unseen \x00\x7f bytes"]


@pytest.mark.ci_required("torch")
@pytest.mark.parametrize("given", ["directory", "vocab.json"])
def test_prepare_reads_gpt2s_original_tokenizer_files(transformers, tmp_path, given):
    """prepare --tokenizer read only a tokenizer.json: GPT-2's original release (vocab.json +
    merges.txt) had to be converted with transformers first. Now the directory (or its
    vocab.json) is read directly: the ids equal transformers' GPT2Tokenizer from the same files
    and OpenAI's own encoder on varied text (a document's <|endoftext|> text stays text; a
    prompt's is the token), and the data is recorded as a tokenizer.json-prepared one, so that
    sampling's decode and --init-from's tokenizer check work on it unchanged."""
    import hashlib
    tokenizers = pytest.importorskip("tokenizers")
    d = _gpt2_original_files(tokenizers, tmp_path / "gpt2")
    vocab, merges = json.loads((d / "vocab.json").read_text()), (d / "merges.txt").read_text()
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in GPT2_DOCUMENTS))
    spec = d if given == "directory" else d / "vocab.json"
    r = run_cli("prepare", tmp_path / "c.jsonl", "--tokenizer", spec, "--out", tmp_path / "data",
                "--val-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    eot = vocab["<|endoftext|>"]
    assert (meta["tokenizer"], meta["tokenizer_file"], meta["eot_token"], meta["eot_id"],
            meta["vocab_size"], meta["tokenizer_source"]) == \
        ("file", "tokenizer.json", "<|endoftext|>", eot, len(vocab), str(d / "vocab.json"))
    saved = (tmp_path / "data" / "tokenizer.json").read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(saved).hexdigest()
    ds = TokenDataset(tmp_path / "data")
    ids = np.concatenate([ds.splits["train"], ds.splits["val"]]).tolist()
    theirs = transformers.GPT2Tokenizer.from_pretrained(d)
    want, openai = [], []
    for text in GPT2_DOCUMENTS:
        want += theirs(text, split_special_tokens=True)["input_ids"] + [eot]
        openai += _openai_gpt2_encode(text, vocab, merges) + [eot]
    assert ids == want == openai
    # what sample reads: the saved tokenizer.json; a prompt's <|endoftext|> is the token
    tok = load_tokenizer(tmp_path / "data", meta)
    assert tok.decode(ids) == "<|endoftext|>".join(GPT2_DOCUMENTS) + "<|endoftext|>"
    prompt = "a prompt<|endoftext|>next"
    assert tok.encode(prompt).tolist() == theirs.encode(prompt)
    assert eot in theirs.encode(prompt)
    # --init-from a GPT-2 directory with these files: its tokenizer check passes
    w = _write_gpt2_dir(tmp_path / "w", ModelConfig(vocab_size=len(vocab), **TINY))
    for name in ("vocab.json", "merges.txt"):
        (w / name).write_bytes((d / name).read_bytes())
    r = run_cli("train", "--init-from", w, "--data", tmp_path / "data", "--out",
                tmp_path / "run", "--max-steps", 1, "--sample-tokens", 0, "--backend", "numpy",
                "--batch-size", 2, "--seq-len", 8)
    assert r.returncode == 0, r.stderr
    # and the run's export hands transformers the same tokenizer
    r = run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in GPT2_DOCUMENTS + [prompt]:
        assert exported.encode(text) == theirs.encode(text), text


@pytest.mark.ci_required("torch")
def test_prepare_honours_gpt2s_added_tokens_json(transformers, tmp_path):
    """Tokens added to GPT-2's vocabulary after training (added_tokens.json, as transformers'
    slow tokenizers save them) keep their ids and are matched in text as transformers matches
    them; --init-from's check, which counts them, passes."""
    tokenizers = pytest.importorskip("tokenizers")
    d = _gpt2_original_files(tokenizers, tmp_path / "gpt2")
    n = len(json.loads((d / "vocab.json").read_text()))
    (d / "added_tokens.json").write_text(json.dumps({"<pad>": n, "<sep>": n + 1}))
    text = "a<pad>b <sep> c"
    (tmp_path / "c.txt").write_text(text * 50)
    meta = prepare_data(tmp_path / "c.txt", tmp_path / "data", tokenizer=str(d))
    assert meta["vocab_size"] == n + 2
    ds = TokenDataset(tmp_path / "data")
    ids = np.concatenate([ds.splits["train"], ds.splits["val"]]).tolist()
    theirs = transformers.GPT2Tokenizer.from_pretrained(d)
    assert ids == theirs(text * 50)["input_ids"] + [meta["eot_id"]]
    assert {n, n + 1} <= set(ids)
    w = _write_gpt2_dir(tmp_path / "w", ModelConfig(vocab_size=n + 2, **TINY))
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (w / name).write_bytes((d / name).read_bytes())
    GpuTrainer(None, TrainConfig(), tmp_path / "data", tmp_path / "a", backend="numpy",
               init_from=w, **QUIET)


def test_init_from_checks_gpt2s_vocab_json_like_tokenizer_json(tmp_path, byte_data):
    """A GPT-2 directory with GPT-2's original tokenizer files (vocab.json + merges.txt, no
    tokenizer.json) was not checked: byte-level data trained silently on ids that meant other
    tokens. Now vocab.json (+ added_tokens.json) is compared as tokenizer.json is, and the
    error says how to prepare data with that tokenizer; following it passes."""
    tokenizers = pytest.importorskip("tokenizers")
    d = _gpt2_original_files(tokenizers, _write_gpt2_dir(tmp_path / "gpt2",
                                                         ModelConfig(vocab_size=400, **TINY)))
    assert_one_line_error(run_cli("train", "--init-from", d, "--data", byte_data, "--out",
                                  tmp_path / "o", "--backend", "numpy"),
                          rf"{byte_data} was prepared with another tokenizer \(byte, vocab 257\) "
                          rf"than {d}/vocab\.json: the weights' token ids would stand for other "
                          rf"tokens; prepare the data with `cllm-gpu prepare \.\.\. --tokenizer "
                          rf"{d}/vocab\.json`$")
    assert not list((tmp_path / "o").glob("ckpt-*"))
    # the advice, followed: data prepared with that vocab.json starts from these weights
    (tmp_path / "c.txt").write_text(GPT2_CORPUS)
    prepare_data(tmp_path / "c.txt", tmp_path / "data", tokenizer=str(d / "vocab.json"))
    GpuTrainer(None, TrainConfig(), tmp_path / "data", tmp_path / "a", backend="numpy",
               init_from=d, **QUIET)
    # a token added to the weights' vocabulary after training (added_tokens.json) counts too
    n = len(json.loads((d / "vocab.json").read_text()))
    (d / "added_tokens.json").write_text(json.dumps({"<pad>": n}))
    with pytest.raises(ConfigError, match=r"prepared with another tokenizer .* than "
                                          r".*/vocab\.json"):
        GpuTrainer(None, TrainConfig(), tmp_path / "data", tmp_path / "b", backend="numpy",
                   init_from=d, **QUIET)
    (d / "vocab.json").write_text('{"a": "0"}')
    with pytest.raises(ConfigError, match=r"vocab\.json: expected a JSON object of token -> id"):
        GpuTrainer(None, TrainConfig(), tmp_path / "data", tmp_path / "c", backend="numpy",
                   init_from=d, **QUIET)


@pytest.mark.parametrize("option,value", [("attn_bias", "alibi"), ("pos_emb", "none")])
def test_export_refuses_a_run_without_a_gpt2_equivalent(tmp_path, option, value):
    """`export` reads the options of the checkpoint's model config by name, before anything
    else, and refuses in one line; nothing is written."""
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros,
                         {"model_config": {**cfg.to_dict(), option: value}})
    assert_one_line_error(run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf"),
                          rf"no Hugging Face GPT-2 equivalent: the model has {option}="
                          rf"'{value}' \(GPT-2")
    assert not (tmp_path / "hf").exists()


def test_export_of_a_checkpoint_from_before_the_bias_options(tmp_path):
    """A model_config written before attn_bias / pos_emb existed is GPT-2 (they load as none /
    learned: docs/attention_bias.md) and exports. Mutation audit: the export's check taking
    any other default for an absent field (refusing every old checkpoint) passed test_hf."""
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("attn_bias", "pos_emb")}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros, {"model_config": old})
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_positions"] == cfg.block_size and config["n_head"] == cfg.n_head


def test_export_with_a_data_dir_that_is_not_there_is_an_error(tmp_path):
    """--data given and wrong: exported without a tokenizer and exit 0 before; now one line,
    nothing written. Without --data, a run whose recorded data is gone still exports."""
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros,
                         {"model_config": cfg.to_dict(), "data": {"dir": str(tmp_path / "gone")}})
    with pytest.raises(DataError, match=r"--data .*typo: no meta.json there"):
        hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=tmp_path / "typo")
    assert not (tmp_path / "hf").exists()
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf")
    assert "no tokenizer exported" in notes[-1] and (tmp_path / "hf" / "config.json").exists()
    # a tokenizer.json already there (an earlier export's) is kept, and said to be unchecked
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf")
    assert "no tokenizer exported" in notes[-2] and "tokenizer.json left as it was" in notes[-1]


@pytest.mark.parametrize("kind", ["directory", "fifo", "broken link"])
def test_export_refuses_a_recorded_meta_json_that_is_not_a_file(tmp_path, kind):
    """The run's recorded data directory is there, and its meta.json is there but no file: the
    data is damaged, not gone. train and sample refuse it (read_meta); export took it for
    absent and exported without a tokenizer, exit 0 (before 2026-12-02). Now one line naming
    it, as they say, and nothing written; a data directory that is gone still exports."""
    import os
    from cllm_gpu.data import read_meta
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    data = tmp_path / "data"
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros,
                         {"model_config": cfg.to_dict(), "data": {"dir": str(data)}})
    data.mkdir()
    meta = data / "meta.json"
    {"directory": meta.mkdir, "fifo": lambda: os.mkfifo(meta),
     "broken link": lambda: meta.symlink_to(tmp_path / "nowhere")}[kind]()
    message = re.escape(f"{meta}: not a regular file (run `cllm-gpu prepare`)")
    with pytest.raises(DataError, match=message):
        read_meta(data)  # what train and sample read
    assert_one_line_error(run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf"), message)
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_leaves_the_directory_as_it_was(tmp_path):
    """The data's tokenizer.json no longer matches meta.json: export refuses, in one line. It
    wrote model.safetensors and config.json first, over the previous export's (whose tokenizer
    then stood beside another model), and left them in a new directory on exit 1. An --hf
    inside the run (a checkpoint directory) overwrote the checkpoint's model.safetensors:
    its only checkpoint no longer verified."""
    pytest.importorskip("tokenizers")
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    from cllm_gpu.data import prepare
    meta = prepare(tmp_path / "c.txt", tmp_path / "data", tokenizer="bpe", bpe_vocab_size=300)
    cfg = ModelConfig(vocab_size=meta["vocab_size"], **TINY)
    tc = TrainConfig(batch_size=2, max_steps=1, eval_interval=0)
    GpuTrainer(cfg, tc, tmp_path / "data", tmp_path / "run", backend="numpy", **QUIET).train()
    assert run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    GpuTrainer(None, dataclasses.replace(tc, max_steps=2), tmp_path / "data", tmp_path / "run",
               backend="numpy", resume=tmp_path / "run", **QUIET).train()  # step 2 to export
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} == set(before)
    tok = tmp_path / "data" / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")
    for out in (tmp_path / "hf", tmp_path / "new" / "hf"):
        assert_one_line_error(run_cli("export", tmp_path / "run", "--hf", out),
                              r"tokenizer\.json: tokenizer does not match meta\.json")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert not (tmp_path / "new").exists()
    ck_dir = ckpt.find_resumable(tmp_path / "run").dir
    assert_one_line_error(run_cli("export", tmp_path / "run", "--hf", ck_dir),
                          r"holds a checkpoint \(state\.json\): the export would replace its "
                          r"model\.safetensors")
    assert ckpt.find_resumable(tmp_path / "run").dir == ck_dir  # still verifies


@pytest.mark.parametrize("garbage", [b"not json at all", b'{"model": {}}'])
def test_export_refuses_a_tokenizer_json_that_sample_refuses(tmp_path, garbage):
    """A data tokenizer.json replaced and meta.json's SHA-256 resealed to match: train and
    sample load it and refuse it; export copied it unread into the export, exit 0 (before
    2026-12-02). Now export loads it as they do: one line naming it, nothing written."""
    pytest.importorskip("tokenizers")
    import hashlib
    from cllm_gpu.data import load_tokenizer, prepare, read_meta
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    meta = prepare(tmp_path / "c.txt", tmp_path / "data", tokenizer="bpe", bpe_vocab_size=300)
    cfg = ModelConfig(vocab_size=meta["vocab_size"], **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros,
                         {"model_config": cfg.to_dict(), "data": {"dir": str(tmp_path / "data")}})
    (tmp_path / "data" / "tokenizer.json").write_bytes(garbage)
    meta["tokenizer_sha256"] = hashlib.sha256(garbage).hexdigest()
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"data/tokenizer\.json: cannot load tokenizer"):
        load_tokenizer(tmp_path / "data", read_meta(tmp_path / "data"))  # what sample does
    assert_one_line_error(run_cli("export", tmp_path / "run", "--hf", tmp_path / "hf"),
                          r"data/tokenizer\.json: cannot load tokenizer")
    assert not (tmp_path / "hf").exists()


def test_export_reads_a_meta_json_that_is_not_utf8_as_one_error(tmp_path):
    """export read meta.json catching only OSError and JSON errors: bytes that are not UTF-8
    were a UnicodeDecodeError traceback. Nothing is written."""
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros, {"model_config": cfg.to_dict()})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match=r"data/meta\.json: not valid JSON \(not UTF-8: byte 0xff "
                                        r"at offset 0\)$"):
        hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=tmp_path / "data")
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_leaves_an_earlier_export_as_it_was(tmp_path, monkeypatch):
    """export wrote model.safetensors and config.json, then the tokenizer: a tokenizer that
    could not be exported, or a full disk while writing it, left the directory with the new
    weights beside the earlier export's tokenizer, exit 1. Now nothing there changes."""
    import errno
    from pathlib import Path
    cfg = ModelConfig(vocab_size=10, **TINY)
    for step in (1, 2):
        sd = init_params(cfg, step)
        zeros = {k: np.zeros_like(v) for k, v in sd.items()}
        ckpt.save_checkpoint(tmp_path / "run", step, sd, zeros, zeros,
                             {"model_config": cfg.to_dict()})
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 10,
                                                "dtype": "uint16"}))
    (data / "tokenizer.json").write_text(_word_tokenizer_json(10, "earlier"))
    out = tmp_path / "hf"
    hf.export_hf(tmp_path / "run" / "ckpt-00000001", out, data_dir=data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"model.safetensors", "config.json", "generation_config.json",
                           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json"}
    write_bytes = Path.write_bytes

    def disk_full_at_the_tokenizer(path, data):
        if path.name.startswith(".tokenizer.json."):  # its temporary (data._temporary_path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_tokenizer)
    with pytest.raises(ConfigError, match=rf"{out}/tokenizer.json: cannot write \(No space left "
                                          rf"on device\); {out} is as it was"):
        hf.export_hf(tmp_path / "run" / "ckpt-00000002", out, data_dir=data)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    (data / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer file missing"):
        hf.export_hf(tmp_path / "run" / "ckpt-00000002", out, data_dir=data)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_refuses_models_without_a_gpt2_equivalent():
    """docs/design.md: an attention bias or pos_emb="none" has no GPT-2 equivalent."""
    base = ModelConfig(vocab_size=10, **TINY).to_dict()
    assert hf.hf_incompatibility(ModelConfig(**base)) is None
    assert hf.hf_incompatibility(ModelConfig(**dict(base, attn_bias="none",
                                                    pos_emb="learned"))) is None
    assert "attn_bias='alibi'" in hf.hf_incompatibility(
        ModelConfig(**dict(base, attn_bias="alibi", pos_emb="learned")))
    assert "pos_emb='none'" in hf.hf_incompatibility(
        ModelConfig(**dict(base, attn_bias="none", pos_emb="none")))
    # nor can GPT-2 weights start such a model (--init-from with a config of one's own)
    with pytest.raises(ConfigError, match=r"GPT-2 weights cannot start a model with "
                                          r"attn_bias='lattice'"):
        hf.check_matches_gpt2(ModelConfig(**dict(base, attn_bias="lattice")),
                              ModelConfig(**base), "gpt2/config.json")


@pytest.mark.parametrize("option,value,why", [
    ("n_inner", 32, r"cllm-gpu's MLP is 4 \* n_embd wide"),
    ("layer_norm_epsilon", 1.001e-05, r"cllm-gpu's LayerNorm epsilon is 1e-05"),
    ("scale_attn_weights", False, r"cllm-gpu scales attention scores by 1/sqrt\(head_dim\)"),
    ("scale_attn_by_inverse_layer_idx", True, r"cllm-gpu does not scale attention by layer"),
    ("tie_word_embeddings", False, r"cllm-gpu ties the output projection to wte"),
    ("add_cross_attention", True, r"cllm-gpu has no cross-attention"),
])
def test_init_from_refuses_each_gpt2_option_that_computes_another_function(tmp_path, option,
                                                                            value, why):
    """Each GPT2Config option that changes what the model computes (docs/design.md: MLP
    4 * n_embd, scores scaled by 1/sqrt(head_dim) only, lm_head tied to wte, no
    cross-attention) is refused naming it; none of them had a test, so dropping any one check
    went unnoticed. The values that compute cllm-gpu's function are accepted."""
    cfg = ModelConfig(vocab_size=100, **TINY)
    d = _write_gpt2_dir(tmp_path / "no", cfg, config={option: value})
    with pytest.raises(ConfigError, match=rf"config\.json: {option} = {value!r} is not "
                                          rf"supported \({why}"):
        hf.gpt2_model_config(d)
    same = {"n_inner": 4 * 16, "layer_norm_epsilon": 1e-05, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True,
            "add_cross_attention": False}[option]
    d = _write_gpt2_dir(tmp_path / "yes", cfg, config={option: same})
    assert hf.gpt2_model_config(d) == ModelConfig(vocab_size=100, padded_vocab_size=128, **TINY)


def test_the_byte_tokenizers_tokenizer_json_is_gpt2s_byte_table(transformers):
    """export's tokenizer.json for byte data: id b is GPT-2's character for byte b (the table
    every byte-level tokenizer shares: transformers' bytes_to_unicode), the ids of any text are
    its UTF-8 bytes (every byte UTF-8 text can hold, U+0000 included), decoding gives the text
    back, and end-of-text is the special token 256 (dropped by skip_special_tokens), absent in
    data prepared before end-of-text existed. Mutation audit: two bytes' ids swapped, the
    end-of-text token added as a plain token, or added (left out) whatever the data's eot_id,
    all passed the export test, which tokenizes one short text through transformers (which adds
    the tokenizer_config's eos_token itself when tokenizer.json lacks it)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tok_json = json.loads(ByteTokenizer(256).to_hf_json())
    assert tok_json["model"]["vocab"] == {c: b for b, c in bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer.from_str(ByteTokenizer(256).to_hf_json())
    # every 1- and 2-byte character, then one of each lead byte of 3 and 4 bytes
    text = "".join(map(chr, [*range(0x800), *(max(0x800, x << 12) for x in range(16)),
                             0x10000, 0x40000, 0x80000, 0xC0000, 0x100000, 0x10FFFF]))
    assert {b for ch in text for b in ch.encode("utf-8")} == {
        *range(0x80), *range(0x80, 0xC0), *range(0xC2, 0xF5)}  # all UTF-8 can hold
    ids = tok.encode(text).ids
    assert ids == ByteTokenizer(256).encode(text).tolist()
    assert tok.decode(ids) == text
    assert tok.encode(text + "<|endoftext|>x").ids == ids + [256, ord("x")]
    assert tok.decode(ids + [256], skip_special_tokens=True) == text
    assert tok.decode(ids + [256], skip_special_tokens=False) == text + "<|endoftext|>"
    assert (tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")) == (257, 256)
    old = tokenizers.Tokenizer.from_str(ByteTokenizer(None).to_hf_json())
    assert (old.get_vocab_size(), old.token_to_id("<|endoftext|>")) == (256, None)


def test_export_of_byte_data_without_end_of_text(transformers, byte_data, tmp_path):
    """Data prepared before end-of-text existed (meta.json without eot_id, vocabulary 256): the
    export invents no end-of-text: none in tokenizer.json, tokenizer_config.json, config.json or
    generation_config.json, and transformers' tokenizer has the model's 256 ids. Mutation
    audit: eot_id taken as 256, the byte tokenizer built with its default end-of-text, or
    tokenizer_config naming <|endoftext|> anyway (transformers then adds it as a 257th token,
    past the model's rows) all passed."""
    pytest.importorskip("tokenizers")
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((byte_data / "meta.json").read_text())
    for key in ("eot_id", "eot_token"):
        meta.pop(key, None)
    (old / "meta.json").write_text(json.dumps(dict(meta, vocab_size=256)))
    _one_step_run(tmp_path / "run", vocab_size=256)
    hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=old)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (None, None)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (None, None)
    assert "eos_token" not in tok_cfg and "bos_token" not in tok_cfg
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (len(tok), tok.eos_token_id, tok.bos_token_id) == (256, None, None)
    assert tok("a<|endoftext|>").input_ids == list(b"a<|endoftext|>")


def test_export_names_a_user_tokenizers_own_end_of_text(transformers, tmp_path):
    """A user's tokenizer.json whose end-of-text is not GPT-2's (prepare --eot-token "</s>"):
    tokenizer_config.json names that token, and transformers' eos and bos are its id, the id in
    config.json. Mutation audit: tokenizer_config naming <|endoftext|> whatever the data's
    eot_token passed (transformers then added it as a new token, past the model's rows).
    Exported over a directory that held a GPT-2 saved by transformers 4 (special_tokens_map.json,
    added_tokens.json): those files outlived the export and transformers read them over the
    new tokenizer: eos <|endoftext|> as a new id 289 past the model's 289 rows, and pad too."""
    tokenizers = pytest.importorskip("tokenizers")
    corpus = "the quick brown fox jumps over the lazy dog. " * 50
    user = tokenizers.ByteLevelBPETokenizer()
    user.train_from_iterator([corpus], vocab_size=300, special_tokens=["</s>"],
                             show_progress=False)
    user.save(str(tmp_path / "user.json"))
    (tmp_path / "c.txt").write_text(corpus)
    meta = prepare_data(tmp_path / "c.txt", tmp_path / "data",
                        tokenizer=str(tmp_path / "user.json"), eot_token="</s>")
    assert meta["eot_token"] == "</s>"
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    (tmp_path / "hf").mkdir()
    gpt2s = "<|endoftext|>"
    (tmp_path / "hf" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": gpt2s, "eos_token": gpt2s, "unk_token": gpt2s, "pad_token": gpt2s}))
    (tmp_path / "hf" / "added_tokens.json").write_text(json.dumps({gpt2s: 50256}))
    hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=tmp_path / "data")
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("</s>", "</s>")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == tok.bos_token_id == meta["eot_id"] == conf["eos_token_id"]
    assert len(tok) == meta["vocab_size"] and tok.pad_token is None
    assert tok(gpt2s).input_ids == tok.backend_tokenizer.encode(gpt2s).ids  # no added token


@pytest.mark.parametrize("template", ["[CLS] $A [SEP]", None])
def test_export_says_transformers_adds_the_post_processors_tokens(transformers, tmp_path,
                                                                  template):
    """A user's tokenizer.json whose post-processor adds tokens to each text (BERT's [CLS] $A
    [SEP]): prepare leaves them out of the documents, but the exported tokenizer.json, called
    as transformers calls it, adds them. The export says so and how to call it; without a
    post-processor (or GPT-2's, which adds none) there is nothing to say."""
    tk = pytest.importorskip("tokenizers")
    words = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "<|endoftext|>": 3, "hello": 4, "world": 5}
    tok = tk.Tokenizer(tk.models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"])
    if template is not None:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=template, special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.save(str(tmp_path / "user.json"))
    (tmp_path / "c.txt").write_text("hello world world hello")
    meta = prepare_data(tmp_path / "c.txt", tmp_path / "data",
                        tokenizer=str(tmp_path / "user.json"))
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=tmp_path / "data")
    said = [n for n in notes if "post-processor" in n]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("hello world", add_special_tokens=False).input_ids == [4, 5]
    if template is None:
        assert said == [] and hf_tok("hello world").input_ids == [4, 5]
    else:
        assert said == ["tokenizer: its post-processor adds [CLS], [SEP] to each text in "
                        "transformers (tokenizer(text)); the model was trained without them: "
                        "call it with add_special_tokens=False"]
        assert hf_tok("hello world").input_ids == [1, 4, 5, 2]


def test_export_of_data_prepared_with_the_post_processors_tokens_notes_nothing(tmp_path):
    """Data prepared before meta.json recorded add_special_tokens holds the post-processor's
    tokens ([CLS] ... [SEP]) in every document: transformers adding them to each text is how
    the model was trained, and the export must not tell users to leave them out. Mutation
    audit (h29j): the note's condition without `tok.add_special_tokens` passed every test."""
    tk = pytest.importorskip("tokenizers")
    words = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "<|endoftext|>": 3, "hello": 4, "world": 5}
    tok = tk.Tokenizer(tk.models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"])
    tok.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.save(str(tmp_path / "user.json"))
    (tmp_path / "c.txt").write_text("hello world world hello")
    meta = prepare_data(tmp_path / "c.txt", tmp_path / "data",
                        tokenizer=str(tmp_path / "user.json"))
    del meta["add_special_tokens"]  # as prepared before the field: the library's default
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    assert load_tokenizer(tmp_path / "data", meta).encode("hello").tolist() == [1, 4, 2]
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=tmp_path / "data")
    assert [n for n in notes if "post-processor" in n] == []


def test_export_writes_gpt2s_special_ids_and_float32(tmp_path):
    """GPT-2's convention (transformers' GPT2Config): bos = eos = the end-of-text id, in
    config.json and generation_config.json alike; the run's dropout in GPT-2's three places;
    the tokenizer's model_max_length the block size; the weights float32 (docs/finetune.md).
    Only eos was checked: a wrong bos, dropout or length, or float64 tensors, passed."""
    cfg = ModelConfig(vocab_size=10, dropout=0.1, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros, {"model_config": cfg.to_dict()})
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 10,
                                                "dtype": "uint16", "eot_id": 7}))
    (data / "tokenizer.json").write_text(_word_tokenizer_json(10))
    hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=data)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (7, 7)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (7, 7)
    assert (conf["resid_pdrop"], conf["embd_pdrop"], conf["attn_pdrop"]) == (0.1, 0.1, 0.1)
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 16 == conf["n_positions"]
    tensors, _ = safetensors_io.load_file(tmp_path / "hf" / "model.safetensors")
    assert {str(a.dtype) for a in tensors.values()} == {"float32"}
    assert set(tensors) == set(sd)  # GPT-2's names, no second (lm_head) copy of wte


def test_init_from_pads_the_vocabulary_to_a_multiple_of_64(tmp_path):
    """--help: "the vocabulary rounded up to a multiple of 64, e.g. 50257 -> 50304". The only
    sizes tested were 50,257 and 100, which a multiple of 128, or a tile added even to a
    multiple, pad the same; a multiple of 64 stays as it is."""
    for vocab, padded in ((1, 64), (257, 320), (320, 320), (321, 384), (50257, 50304)):
        d = tmp_path / str(vocab)
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf.gpt2_config(
            ModelConfig(vocab_size=vocab, **TINY))))
        assert hf.gpt2_model_config(d).padded_vocab_size == padded, vocab


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
def test_a_model_config_beside_init_from_must_be_the_same_gpt2(field):
    """Each of GPT-2's five sizes is compared (only n_layer was tested): n_head differing
    with the same n_embd would load every tensor (the shapes agree) into another function."""
    gpt2 = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16)
    other = ModelConfig(**{**gpt2.to_dict(), "padded_vocab_size": 0,
                           field: getattr(gpt2, field) * 2})
    with pytest.raises(ConfigError, match=rf"^g/config\.json: {field} is "
                                          rf"{getattr(gpt2, field)} there, the model config "
                                          rf"says {getattr(other, field)}$"):
        hf.check_matches_gpt2(other, gpt2, "g/config.json")
    hf.check_matches_gpt2(dataclasses.replace(gpt2, dropout=0.1, padded_vocab_size=128), gpt2,
                          "g/config.json")


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"vocab_size": 300, "n_positions": 32, "n_embd": 16}), "missing n_layer, n_head"),
    (json.dumps({"vocab_size": 300, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
                 "tie_word_embeddings": False}),
     "tie_word_embeddings = False is not supported (cllm-gpu ties the output projection"),
    (json.dumps({"vocab_size": 300, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
                 "n_inner": 32}), "n_inner = 32 is not supported (cllm-gpu's MLP is 4 * n_embd"),
])
def test_init_from_config_json_refusals_name_the_file(tmp_path, text, message):
    """--init-from's config.json: unreadable, not an object, keys missing or a setting cllm-gpu
    does not compute: one line naming the file (branches the coverage audit found untested)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        hf.gpt2_model_config(tmp_path)


def _one_step_run(run, vocab_size=10, state=None):
    """A checkpoint of step 1 at `run` (no trainer: init_params and zero moments)."""
    cfg = ModelConfig(vocab_size=vocab_size, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(run, 1, sd, zeros, zeros, {"model_config": cfg.to_dict(),
                                                    **(state or {})})


def test_export_of_a_run_that_records_no_data_directory(tmp_path):
    """A checkpoint whose state.json has no "data" (one saved by the library, not a training
    run) and no --data: the weights and configs are exported, with a note saying why there is
    no tokenizer, and no end-of-text id is invented."""
    _one_step_run(tmp_path / "run")
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf")
    assert notes[-1] == ("no tokenizer exported: the checkpoint records no data directory "
                         "(give --data)")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors"}
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (None, None)


def test_an_export_without_a_tokenizer_removes_a_killed_exports_tokenizer_temporaries(
        tmp_path, byte_data):
    """An export killed (kill -9) while writing model.safetensors leaves its temporaries of
    the tokenizer files; an export that writes none (no data directory recorded) removed only
    those of the names it writes, leaving the others for good (seen failing before h30m).
    Every export removes a killed writer's temporaries of every file an export may write."""
    from cllm_gpu.data import _pid_namespace
    from test_checkpoint import _finished_pid
    meta = json.loads((byte_data / "meta.json").read_text())
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    out = tmp_path / "hf"
    out.mkdir()
    dead, here = _finished_pid(), _pid_namespace()
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "model.safetensors"):
        (out / f".{name}.{dead}.{here}.0123abcd.tmp").write_bytes(b"partial")
    hf.export_hf(tmp_path / "run", out)
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors"}
    pytest.importorskip("tokenizers")  # builds the byte tokenizer's tokenizer.json
    hf.export_hf(tmp_path / "run", out, data_dir=byte_data)  # EXPORT_FILES names all it writes
    assert {p.name for p in out.iterdir()} == set(hf.EXPORT_FILES)


def test_byte_tokenizer_export_without_the_tokenizers_package(tmp_path, byte_data,
                                                              monkeypatch):
    """The byte tokenizer's tokenizer.json is built with `tokenizers`; without it the export
    goes ahead with a note and no tokenizer files (not an ImportError traceback, and not a
    tokenizer_config.json naming a tokenizer.json that is not there)."""
    meta = json.loads((byte_data / "meta.json").read_text())
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=byte_data)
    assert notes[-1] == ("no tokenizer exported: the byte tokenizer's tokenizer.json needs the "
                         "`tokenizers` package")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors"}
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["eos_token_id"] == meta["eot_id"]  # the data's meta.json was still read


def test_bpe_export_without_the_tokenizers_package_is_one_line(tmp_path, capsys, monkeypatch):
    """A BPE (or user) tokenizer.json is loaded before it is exported, as sample loads it, and
    loading it needs `tokenizers`: without the package the export is refused in one line that
    names the extra to install, and nothing is written (the weights are not exported without
    the tokenizer they were trained with)."""
    pytest.importorskip("tokenizers")
    from clihelp import main_in_process
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    meta = prepare_data(tmp_path / "c.txt", tmp_path / "data", tokenizer="bpe",
                        bpe_vocab_size=300)
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"])
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import fails
    code, err = main_in_process(capsys, "export", tmp_path / "run", "--hf", tmp_path / "hf",
                                "--data", tmp_path / "data")
    assert (code, err) == (1, ["error: Hugging Face tokenizers need the `tokenizers` package "
                               "(pip install 'cllm-gpu[bpe]')"])
    assert not (tmp_path / "hf").exists()


def test_export_to_a_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    """--hf below a file: mkdir fails (Not a directory); one line, exit 1, nothing made."""
    from clihelp import main_in_process
    _one_step_run(tmp_path / "run")
    (tmp_path / "afile").write_text("not a directory")
    code, err = main_in_process(capsys, "export", tmp_path / "run",
                                "--hf", tmp_path / "afile" / "hf")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path / 'afile' / 'hf'}: cannot create the export "
                             f"directory (Not a directory)"), err
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.mark.parametrize("fail_at", ["config.json", "model.safetensors"])
def test_a_write_that_fails_mid_export_leaves_no_new_directory(tmp_path, capsys, monkeypatch,
                                                               fail_at):
    """A full disk mid-export into a directory the export creates (two levels of it): one
    line, exit 1, and neither directory is left behind (the files written before the failure
    are removed too), whether the failure is at the first file or after others are written."""
    import errno
    from pathlib import Path
    from clihelp import main_in_process
    _one_step_run(tmp_path / "run")
    write_bytes, save_file = Path.write_bytes, safetensors_io.save_file

    def full_at(path):
        if Path(path).name.startswith(f".{fail_at}."):  # its temporary (data._temporary_path)
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", lambda p, d: full_at(p) or write_bytes(p, d))
    monkeypatch.setattr(safetensors_io, "save_file",
                        lambda t, p, **k: full_at(p) or save_file(t, p, **k))
    out = tmp_path / "new" / "hf"
    code, err = main_in_process(capsys, "export", tmp_path / "run", "--hf", out)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {out / fail_at}: cannot write (No space left on "
                             f"device)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_export_keeps_its_error_when_the_clean_up_fails(tmp_path, monkeypatch):
    """The empty directory cannot be removed (rmdir fails): the user is told why the export
    failed (the write), not why the clean-up did."""
    import errno
    from pathlib import Path
    _one_step_run(tmp_path / "run")

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def busy(path):
        raise OSError(errno.EBUSY, "Device or resource busy")
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    monkeypatch.setattr(Path, "rmdir", busy)
    with pytest.raises(ConfigError, match=r"config.json: cannot write \(No space left on "):
        hf.export_hf(tmp_path / "run", tmp_path / "hf")


def test_export_refuses_data_prepared_with_another_tokenizer(byte_data, tmp_path):
    """export RUN --hf X --data OTHER exported OTHER's tokenizer beside weights trained with
    another one (exit 0). Found by argv fuzzing. The checkpoint records its tokenizer: refused
    in one line, nothing written; a checkpoint that records none exports as before, noted."""
    pytest.importorskip("tokenizers")
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    GpuTrainer(cfg, TrainConfig(batch_size=2, max_steps=1, eval_interval=0), byte_data,
               tmp_path / "run", backend="numpy", **QUIET).train()
    other = tmp_path / "bpe"
    prepare_data(byte_data.parent / "corpus.txt", other, tokenizer="bpe", bpe_vocab_size=257)
    with pytest.raises(DataError, match=rf"^{re.escape(str(other))} was prepared with another "
                                        r"tokenizer \(bpe, vocab 257, .*\(byte, vocab 257, "
                                        r"end-of-text 256\): its ids mean other tokens"):
        hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=other)
    assert not (tmp_path / "hf").exists()
    assert hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=byte_data)[0].startswith(
        "exported ")
    (state_json,) = (tmp_path / "run").glob("ckpt-*/state.json")
    state = json.loads(state_json.read_text())
    del state["data"]["tokenizer"]
    state_json.write_text(json.dumps(state))
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf2", data_dir=other)
    assert any(n.startswith("note: ") and "records no tokenizer" in n for n in notes), notes
    # the run's own recorded data, not a --data given: no note (mutation audit: noting it
    # there too passed every test)
    notes = hf.export_hf(tmp_path / "run", tmp_path / "hf3")
    assert notes[0].startswith("exported ") and not any(n.startswith("note: ") for n in notes)


def test_export_reads_meta_json_and_tokenizer_json_of_one_writer(tmp_path, monkeypatch,
                                                                  word_data):
    """export read the data's meta.json, then its tokenizer.json by name: another prepare
    renaming its files into the directory in between (a tokenizer of the same size, 'a' and
    'b' swapped) paired the first's meta.json with the second's tokenizer.json, and the export
    was refused ('tokenizer does not match meta.json') though neither writer's files were
    wrong. Now export reads both under the directory's lock, shared, as the token files are
    read: the second writer's renames wait until the export has read the first's, and land
    after it."""
    from cllm_gpu import data as data_module
    from cllm_gpu.data import tokenizer_identity
    data, meta = word_data(["<|endoftext|>", "a", "b"], "first")
    other, _ = word_data(["<|endoftext|>", "b", "a"], "other")
    first_tokenizer = (data / "tokenizer.json").read_bytes()
    other_files = {p.name: p.read_bytes() for p in other.iterdir()}
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"],
                  state={"data": {"dir": str(data), "tokenizer": tokenizer_identity(meta)}})
    read_meta, second = hf.read_meta, []

    def reading_meta_while_the_second_writes(data_dir):
        got = read_meta(data_dir)
        second.append(RacingThread(data_module.write_files, data, other_files))
        second[0].start(monkeypatch)  # it renames here, or waits for the export's reads
        return got
    monkeypatch.setattr(hf, "read_meta", reading_meta_while_the_second_writes)
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    monkeypatch.undo()
    second[0].finish()
    assert second[0].waited == ["exclusive"]  # held off by the export's lock
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == first_tokenizer
    assert (data / "tokenizer.json").read_bytes() == other_files["tokenizer.json"]  # it landed


def test_export_writes_the_tokenizer_json_it_checked(tmp_path, monkeypatch, word_data):
    """Where the data directory cannot be locked (no flock), export read tokenizer.json three
    times by name: its SHA-256 checked, parsed, checked again, then read once more for the
    bytes it wrote. A tokenizer.json renamed over after the first read (here) was parsed
    unchecked and the export refused by the second check ('tokenizer does not match
    meta.json'); one renamed over after the second check was exported unchecked. Now it is
    read once: the bytes checked against meta.json (and so against the run's tokenizer) are
    the bytes parsed and exported."""
    from lockrace import rename_over_once_opened
    from cllm_gpu import data as data_module
    from cllm_gpu.data import tokenizer_identity
    data, meta = word_data(["<|endoftext|>", "a", "b"], "first")
    word_data(["<|endoftext|>", "b", "a"], "other")
    first_tokenizer = (data / "tokenizer.json").read_bytes()
    _one_step_run(tmp_path / "run", vocab_size=meta["vocab_size"],
                  state={"data": {"dir": str(data), "tokenizer": tokenizer_identity(meta)}})
    monkeypatch.setattr(data_module, "fcntl", None)
    rename_over_once_opened(monkeypatch, data_module, data / "tokenizer.json",
                            tmp_path / "other.json")
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    monkeypatch.undo()
    assert not (tmp_path / "other.json").exists()  # renamed over while the export read
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == first_tokenizer


def test_init_from_reads_config_tokenizer_and_weights_of_one_export(tmp_path, monkeypatch,
                                                                    word_data):
    """--init-from read the directory's config.json and tokenizer.json, then (after the data
    and memory checks) its weights: an export into the directory landing in between (another
    run's: the same shapes, its tokenizer the same size with 'a' and 'b' swapped) started the
    run from weights trained with the other tokenizer, checked on the first's. Now the three
    are read under the directory's lock, shared: the export's renames (write_files, exclusive)
    wait until the weights are read, and land after."""
    from cllm_gpu import data as data_module
    data, meta = word_data(["<|endoftext|>", "a", "b"], "words")
    _, other_meta = word_data(["<|endoftext|>", "b", "a"], "other")
    cfg = ModelConfig(vocab_size=meta["vocab_size"], **TINY)
    first = _write_gpt2_dir(tmp_path / "first", cfg)
    (first / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    swapped = init_params(cfg, 0)["transformer.wte.weight"][[0, 2, 1]].astype(np.float32)
    second = _write_gpt2_dir(tmp_path / "second", cfg, change={"transformer.wte.weight": swapped})
    (second / "tokenizer.json").write_bytes((tmp_path / "other" / "tokenizer.json").read_bytes())
    second_files = {p.name: p.read_bytes() for p in second.iterdir()}
    check, writer = hf.check_tokenizer_matches, []

    def checked_while_the_second_exports(*args):
        check(*args)
        writer.append(RacingThread(data_module.write_files, first, second_files))
        writer[0].start(monkeypatch)  # it renames here, or waits for the weights' read
    monkeypatch.setattr(hf, "check_tokenizer_matches", checked_while_the_second_exports)
    trainer = GpuTrainer(None, TrainConfig(batch_size=1, eval_interval=0), data,
                         tmp_path / "o", backend="numpy", init_from=first, **QUIET)
    monkeypatch.undo()
    writer[0].finish()
    assert writer[0].waited == ["exclusive"]  # held off by --init-from's lock
    assert (first / "model.safetensors").read_bytes() == second_files["model.safetensors"]
    wte = np.asarray(trainer.model.state_dict()["transformer.wte.weight"])[:3]
    np.testing.assert_array_equal(  # the first export's rows ('a' at 1, 'b' at 2)
        wte, init_params(cfg, 0)["transformer.wte.weight"].astype(np.float32))


def test_export_warns_on_stderr_of_the_newer_checkpoint_it_skipped(tmp_path, capsys):
    """The newest checkpoint does not verify: export takes the one before and says so as sample
    and train do, `warning: skipped ...` on stderr (it printed find_resumable's note bare, on
    stdout, among the lines saying what was written)."""
    from clihelp import main_in_process
    _one_step_run(tmp_path / "run")
    cfg = ModelConfig(vocab_size=10, **TINY)
    sd = init_params(cfg, 1)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    newest = ckpt.save_checkpoint(tmp_path / "run", 2, sd, zeros, zeros,
                                  {"model_config": cfg.to_dict()}, keep=3)
    with open(newest / "model.safetensors", "r+b") as f:  # one byte flipped
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    code, err = main_in_process(capsys, "export", tmp_path / "run", "--hf", tmp_path / "hf")
    assert code == 0
    assert len(err) == 1 and err[0].startswith("warning: skipped ckpt-00000002: "), err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 10


def test_export_then_init_from_gives_back_the_checkpoints_weights_without_torch(tmp_path):
    """Export drops the padded rows of wte (config.json's vocab_size rows) and keeps every other
    tensor as it is; reading the export back for --init-from pads wte again with zero rows and
    gives back each parameter exactly (mutation audit: an export keeping the padded rows, and
    an import putting the rows in another order, passed every test where torch is missing:
    only the transformers tests read the exported shapes)."""
    cfg = ModelConfig(vocab_size=10, padded_vocab_size=64, **TINY)
    sd = init_params(cfg, 0)
    sd["transformer.wte.weight"][cfg.vocab_size:] = 0  # padding: zero, as training keeps it
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "run", 1, sd, zeros, zeros, {"model_config": cfg.to_dict()})
    hf.export_hf(tmp_path / "run", tmp_path / "hf")
    exported, _ = safetensors_io.load_file(tmp_path / "hf" / "model.safetensors")
    assert exported["transformer.wte.weight"].shape == (10, 16)
    for name, a in sd.items():
        want = a[:cfg.vocab_size] if name == "transformer.wte.weight" else a
        np.testing.assert_array_equal(exported[name], want.astype(np.float32), err_msg=name)
    back_cfg = hf.gpt2_model_config(tmp_path / "hf", padded_vocab_size=64)
    assert back_cfg == cfg
    back = hf.load_gpt2_state_dict(tmp_path / "hf", back_cfg)
    assert set(back) == set(sd)
    for name, a in sd.items():
        np.testing.assert_array_equal(back[name], a.astype(np.float32), err_msg=name)


def test_export_refuses_data_with_more_tokens_than_the_model_has_padded_rows_for(tmp_path):
    """The data's vocabulary is checked against the model's vocab_size, not its padded rows:
    a token id past vocab_size has a zero row that training never scored (mutation audit:
    comparing with padded_vocab_size passed every test, whose data had more tokens than the
    padding too)."""
    cfg = ModelConfig(vocab_size=10, padded_vocab_size=64, **TINY)
    sd = init_params(cfg, 0)
    zeros = {k: np.zeros_like(v) for k, v in sd.items()}
    ckpt.save_checkpoint(tmp_path / "padded", 1, sd, zeros, zeros,
                         {"model_config": cfg.to_dict()})
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 12,
                                                "dtype": "uint16", "eot_id": None}))
    (data / "tokenizer.json").write_text(_word_tokenizer_json(12))
    with pytest.raises(DataError, match=r"meta\.json: data vocab_size 12 exceeds the model's 10"):
        hf.export_hf(tmp_path / "padded", tmp_path / "hf", data_dir=data)
    assert not (tmp_path / "hf").exists()


def test_export_of_data_without_end_of_text_names_no_special_tokens(tmp_path):
    """Data prepared without an end-of-text token: the exported tokenizer_config.json and
    special_tokens_map.json name no bos or eos (mutation audit: naming <|endoftext|> anyway
    passed every test where transformers is not installed)."""
    _one_step_run(tmp_path / "run")
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": 10,
                                                "dtype": "uint16", "eot_id": None}))
    (data / "tokenizer.json").write_text(_word_tokenizer_json(10))
    hf.export_hf(tmp_path / "run", tmp_path / "hf", data_dir=data)
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "bos_token" not in tok_cfg and "eos_token" not in tok_cfg
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text()) == {}


def _sharded_gpt2_dir(d, cfg):
    """A GPT-2 directory in two shards and an index, as save_pretrained(max_shard_size=...)
    writes it, made without transformers."""
    one = _write_gpt2_dir(d.with_name(d.name + "-single"), cfg)
    tensors, _ = safetensors_io.load_file(one / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    d.mkdir()
    (d / "config.json").write_bytes((one / "config.json").read_bytes())
    for shard, held in shards.items():
        safetensors_io.save_file({n: tensors[n] for n in held}, d / shard,
                                 metadata={"format": "pt"})
    weight_map = {n: shard for shard, held in shards.items() for n in held}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, one


def test_shards_and_their_index_are_checked_without_torch(tmp_path):
    """The torch-free twin of the shard tests: the shards read as the single file, and each
    disagreement between index and shards is refused naming it (mutation audit: without
    torch installed, every one of these checks, and reading only the first shard, could be
    dropped without a failing test)."""
    cfg = ModelConfig(vocab_size=100, **TINY)
    src, single = _sharded_gpt2_dir(tmp_path / "src", cfg)
    want = hf.load_gpt2_state_dict(single, hf.gpt2_model_config(single))
    got = hf.load_gpt2_state_dict(src, hf.gpt2_model_config(src))
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    moved = sorted(safetensors_io.read_header(src / first)[0])[0]
    cases = [
        (dict(edit_index=lambda m: m.update({moved: "../src-single/model.safetensors"})),
         rf"{re.escape(moved)} is in '\.\./src-single/model\.safetensors', not a file name in"),
        (dict(edit_index=lambda m: m.clear()), r"expected an object with a \"weight_map\""),
        (dict(edit_shards=lambda s: s[second].update({moved: s[first][moved]})),
         rf"index\.json: {re.escape(moved)} is in both {first} and {second}"),
        (dict(edit_index=lambda m: m.update({moved: second})),
         rf"{first}: holds {re.escape(moved)}, but the index lists it in {second}"),
        (dict(edit_shards=lambda s: s[first].pop(moved)),
         rf"index\.json: lists {re.escape(moved)} in {first}, which does not hold it"),
    ]
    for i, (kw, pattern) in enumerate(cases):
        d = _shard_dir(src, tmp_path / f"d{i}", **kw)
        with pytest.raises(CheckpointError, match=pattern):
            hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))
    # model.safetensors beside an index (a damaged one here) is the file read, as transformers
    # reads it first (mutation audit h43d: reading the shards first passed every test)
    d = _shard_dir(src, tmp_path / "both", edit_index=lambda m: m.clear())
    shutil.copy(single / "model.safetensors", d / "model.safetensors")
    got = hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_init_from_refuses_a_weight_stored_transposed(tmp_path):
    """A GPT-2 weight stored in nn.Linear's (out, in) layout instead of Conv1D's (in, out), as a
    conversion from another framework may leave it, has the right size and the wrong shape:
    refused naming both (mutation audit: comparing sizes only passed every test)."""
    cfg = ModelConfig(vocab_size=100, **TINY)
    w = init_params(cfg, 0)["transformer.h.0.attn.c_attn.weight"].astype(np.float32)
    assert w.shape == (16, 48)
    d = _write_gpt2_dir(tmp_path / "t", cfg,
                        change={"transformer.h.0.attn.c_attn.weight": np.ascontiguousarray(w.T)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: transformer\.h\.0\.attn\."
                                              r"c_attn\.weight has shape \(48, 16\), config\.json "
                                              r"implies \(16, 48\)"):
        hf.load_gpt2_state_dict(d, hf.gpt2_model_config(d))


def test_a_directory_whose_added_tokens_differ_from_the_datas_is_refused(tmp_path):
    """The token-by-token comparison of --init-from's tokenizer with the data's takes in the
    added tokens (end-of-text and the like): the same vocabulary with another token at id 10
    is another tokenizer (mutation audit: comparing the model vocabularies only passed every
    test)."""
    tokenizers = pytest.importorskip("tokenizers")

    def word_tokenizer_with(added):
        tok = tokenizers.Tokenizer.from_str(_word_tokenizer_json(10))
        tok.add_special_tokens([added])
        return tok.to_str()
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(word_tokenizer_with("<|endoftext|>"))
    data = tmp_path / "data"
    data.mkdir()
    meta = {"tokenizer": "bpe", "vocab_size": 11, "dtype": "uint16", "eot_id": 10}
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "tokenizer.json").write_text(word_tokenizer_with("<|endoftext|>"))
    hf.check_tokenizer_matches(hf_dir, data, meta)  # the same tokenizer
    (data / "tokenizer.json").write_text(word_tokenizer_with("<pad>"))
    with pytest.raises(ConfigError, match=r"was prepared with another tokenizer"):
        hf.check_tokenizer_matches(hf_dir, data, meta)


def test_a_directorys_tokenizer_json_is_compared_before_its_vocab_json(tmp_path):
    """A directory holding both tokenizer.json and an older vocab.json is compared by its
    tokenizer.json, the file transformers loads first (mutation audit: reading vocab.json
    first passed every test)."""
    pytest.importorskip("tokenizers")
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(_word_tokenizer_json(10))
    (hf_dir / "vocab.json").write_text(json.dumps({f"w{i}": i for i in range(10)}))
    data = tmp_path / "data"
    data.mkdir()
    meta = {"tokenizer": "bpe", "vocab_size": 10, "dtype": "uint16", "eot_id": None}
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "tokenizer.json").write_text(_word_tokenizer_json(10))
    hf.check_tokenizer_matches(hf_dir, data, meta)
    (hf_dir / "tokenizer.json").unlink()  # vocab.json alone: the other tokens
    with pytest.raises(ConfigError, match=r"was prepared with another tokenizer .* than "
                                          r".*vocab\.json"):
        hf.check_tokenizer_matches(hf_dir, data, meta)
