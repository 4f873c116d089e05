"""The CUDA code path of the model and trainer, run on the CPU against a simulated device.

A stand-in `cupy` module whose "device arrays" are a NumPy subclass, and whose CUDA launchers
are replaced by the NumPy references, runs everything the CUDA backend does in Python: the
device-side clip factor and skip, the deferred reading of losses at log points, pinned staging
of token ids, checkpoints from device arenas, resume. Numerically it is the NumPy path, so its
losses must equal the NumPy backend's exactly. The kernels themselves are checked on a GPU
(tests/gpu); this checks the code around them on any machine. Run in its own process
(tests/test_sim_cuda_backend.py): it installs the stand-in into sys.modules.
"""
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class DevArr(np.ndarray):
    """A 'device' array: NumPy memory, but is_device_array() says yes."""

    def get(self):
        return np.array(self)

    def set(self, arr, stream=None):
        self[...] = arr


def dev(a):
    return np.asarray(a).view(DevArr)


class Event:
    recorded = 0

    def __init__(self, disable_timing=False):
        self.done = False

    def record(self, stream=None):
        Event.recorded += 1
        self.done = True

    def synchronize(self):
        assert self.done


cupy = types.ModuleType("cupy")
cupy.__version__ = "simulated"
cupy.ndarray = DevArr
for name in ("matmul", "add", "isfinite", "where", "minimum", "argmax", "nan"):
    setattr(cupy, name, getattr(np, name))
cupy.empty = lambda shape, dtype=np.float32: dev(
    np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.empty(shape, dtype))
cupy.zeros = lambda shape, dtype=np.float32: dev(np.zeros(shape, dtype))
cupy.ones = lambda shape, dtype=np.float32: dev(np.ones(shape, dtype))
cupy.asarray = lambda a, dtype=None: dev(np.array(a, dtype=dtype))
cupy.ascontiguousarray = lambda a, dtype=None: dev(np.ascontiguousarray(a, dtype=dtype))
cupy.cuda = types.SimpleNamespace(
    is_available=lambda: True,
    Device=lambda *a: types.SimpleNamespace(id=0, synchronize=lambda: None),
    runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"simulated GPU"}),
    get_current_stream=lambda: None, Event=Event)
cupyx = types.ModuleType("cupyx")
cupyx.empty_pinned = lambda shape, dtype=np.float32: np.empty(shape, dtype)
sys.modules["cupy"], sys.modules["cupyx"] = cupy, cupyx

from cllm_gpu.ops import _common  # noqa: E402

_common._cupy = cupy
import importlib  # noqa: E402

# (the package exports functions named like some modules: fetch the modules themselves)
adamw, attention, embedding, gelu, grad_norm, layernorm, softmax_xent = (
    importlib.import_module(f"cllm_gpu.ops.{n}") for n in
    ("adamw", "attention", "embedding", "gelu", "grad_norm", "layernorm", "softmax_xent"))

# The launchers are replaced by the references (same signatures), except where the CUDA
# launcher's contract differs: grad_norm and clip_factor return 0-d device arrays, and AdamW
# takes its grad_scale as a device array.
for mod, names in ((embedding, ("embedding_forward", "embedding_backward")),
                   (layernorm, ("layernorm_forward", "layernorm_backward")),
                   (gelu, ("gelu_forward", "gelu_backward")),
                   (attention, ("attention_forward", "attention_backward")),
                   (softmax_xent, ("softmax_xent",))):
    for n in names:
        setattr(mod, n + "_cuda", getattr(mod, n + "_ref"))
grad_norm.grad_norm_cuda = lambda g: dev(np.array(grad_norm.grad_norm_ref(g), dtype=g.dtype))
grad_norm.clip_factor_cuda = lambda norm, max_norm, eps=grad_norm.CLIP_EPS: dev(
    np.array(grad_norm.clip_factor_ref(norm, max_norm, eps), dtype=norm.dtype))


def _adamw_sim(params, grads, m, v, mask, lr, b1, b2, eps, wd, step, grad_scale=1.0):
    gs = float(np.asarray(grad_scale).reshape(-1)[0])
    adamw.adamw_update_ref(params, grads, m, v, mask, lr, b1, b2, eps, wd, step, gs)


adamw.adamw_update_cuda = _adamw_sim

from cllm_gpu import GpuTrainer, ModelConfig, TrainConfig  # noqa: E402
from cllm_gpu.data import prepare  # noqa: E402
from cllm_gpu.errors import NonFiniteError  # noqa: E402

CFG = ModelConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)
lines = []


def trainer(backend, out, data, resume=None, **kw):
    tc = dict(batch_size=3, max_steps=12, eval_interval=6, eval_batches=2, log_interval=5,
              checkpoint_interval=6, dtype="float64", warmup_steps=2)
    tc.update(kw)
    return GpuTrainer(None if resume else CFG, TrainConfig(**tc), data, out, backend=backend,
                      resume=resume, log=lines.append)


def main():
    tmp = Path(tempfile.mkdtemp())
    (tmp / "t.txt").write_text("the simulated device trains like the host. " * 200)
    prepare(tmp / "t.txt", tmp / "tok")
    data = tmp / "tok"
    results = {}

    ref = trainer("numpy", tmp / "np", data).train()
    sim_tr = trainer("cuda", tmp / "sim", data)
    assert sim_tr.backend == "cuda" and any("simulated GPU" in l for l in lines)
    sim = sim_tr.train()
    assert sim["losses"] == ref["losses"], (sim["losses"], ref["losses"])
    assert sim["val_loss"] == ref["val_loss"]
    assert Event.recorded >= 12  # token ids went through the pinned staging path
    recs = [json.loads(l) for l in (tmp / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 5, 10, 12]
    results["same_losses_as_numpy"] = len(sim["losses"])

    # resume on the device path continues exactly
    part = trainer("cuda", tmp / "part", data).train(max_steps=6)
    rest = trainer("cuda", tmp / "part", data, resume=tmp / "part").train()
    assert part["losses"] + rest["losses"] == ref["losses"]
    results["resume_exact"] = True

    # a non-finite step on the device path: update skipped on the device, found at the next
    # log point, named with its step and first bad parameter
    for policy in ("skip", "stop"):
        t = trainer("cuda", tmp / f"nan_{policy}", data, on_nonfinite=policy,
                    max_nonfinite_skips=3)
        orig = t.model.forward

        def forward(idx, tgt=None, dloss=None, t=t, orig=orig):
            s = orig(idx, tgt, dloss)
            if t.step == 6 and tgt is not None:  # the 7th step (the counter moves first)
                t.model.grads["transformer.h.0.mlp.c_fc.weight"][1, 2] = np.inf
            return s
        t.model.forward = forward
        before = {}
        orig_step = t.train_step

        def step(t=t, orig_step=orig_step):
            if t.step == 6:
                before.update(t.model.state_dict())
            r = orig_step()
            if t.step == 7:
                after = t.model.state_dict()
                assert all(np.array_equal(before[k], after[k]) for k in before), "applied"
            return r
        t.train_step = step
        if policy == "skip":
            s = t.train()
            assert s["step"] == 12 and t.nonfinite_skips == 1
            assert any("step 7" in l and "h.0.mlp.c_fc.weight" in l and "skipped" in l
                       for l in lines)
        else:
            try:
                t.train()
                raise AssertionError("no NonFiniteError")
            except NonFiniteError as e:
                assert "step 7" in str(e) and "h.0.mlp.c_fc.weight" in str(e), str(e)
        results[f"nonfinite_{policy}"] = True
    print(json.dumps(results))


if __name__ == "__main__":
    main()
