"""The pairs of kernel instantiations the GPU tests assert bitwise equal (docs/emulator.md,
"Bitwise checks and the GPU's rounding": two instantiations of the same arithmetic) do the
same float arithmetic in the sm_90 machine code: NVRTC 12.9 and CUDA 13's nvcc (the GPU
image's compiler, as NVRTC 13) each compile exactly those instantiations to a CUBIN with
CuPy's options (-ftz=true), nvdisasm (the nvidia-cuda-nvdisasm wheel of the
dev extra) disassembles it, and each pair's float instructions are compared.

The bits agree only if the compiler contracts (FMA) and rounds the same expressions the same
way in both; a kernel edit that makes it fuse a multiply-add in one instantiation only shows
here, without a GPU. What is compared (`float_ops`, `signatures`, `compare`):

- the float instructions: FFMA, FMUL, FADD, FMNMX, MUFU.* (and the double ones), with their
  modifiers (.FTZ, .RZ, ...), operands left out: in program order, and their counts;
- their dataflow signatures: each float instruction with what each operand is, with its sign
  and absolute-value modifiers: the opcode of the float instruction that wrote it, followed
  along the code that falls through to it and through ptxas's register moves and spill
  slots ("?" past a label, a jump or a call, where another
  path may have written it), "x" for a value no float instruction computed (a load, a
  register, uniform register or constant: which one ptxas chose is no matter of arithmetic),
  "0" for RZ, or an immediate's value. An FFMA fed by an FMUL has another signature than one
  fed by a load, so a multiply-add fused differently changes them even where the counts stay
  the same; register numbers and ptxas's order do not. Every distinct signature of each
  instantiation must have an alike one in the other, "?" matching any operand (the blocks are
  laid out apart in some pairs).

Each pair has the strongest check that holds for it (PAIRS says why): SEQUENCE, the ordered
opcodes the same; SCHEDULE, the same counts in another order; COPIES, the signatures only,
where one build repeats the same arithmetic (a loop unrolled more); M_TILES, COPIES and at most
twice the one-tile build's counts; DQ_SCALE, COPIES and the counts the same but the second's
FMULs. test_the_check_sees_a_change_in_one_instantiation plants a change in one AdamW
instantiation and sees COPIES fail.

Not seen: a change that leaves every signature alike, such as which of two products of the
same shape the compiler rounds apart (a*b + c*d fused either way), or one whose operands are
all "?"; nor other compiler versions than NVRTC 12.9 and nvcc 13.0 (the GPU image's NVRTC
13 may be a later minor version)."""
import functools
import importlib.metadata
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from cllm_gpu import kernels
from test_kernels_compile import _nvrtc_or_skip, kernel_name, nvcc13_cubin

pytestmark = pytest.mark.ci_required("nvdisasm")

SEQUENCE, SCHEDULE, COPIES = "sequence", "schedule", "copies"
M_TILES, DQ_SCALE = "m-tiles", "dq-scale"

# the D = 64 forward builds the GPU compares with the default 8x2 (bench_kernels.py
# --attn-fwd-variants, tests/gpu), as kernel_build gives them under those settings
FWD_4X3 = (("CLLM_ATTN_FWD_MIN_BLOCKS_D64", 3), ("CLLM_ATTN_FWD_WARPS_D64", 4))
# (2 blocks per SM is the default: the launcher passes no -D option for it)
FWD_4X2_M2 = (("CLLM_ATTN_FWD_MTILES_D64", 2), ("CLLM_ATTN_FWD_WARPS_D64", 4))
_FWD = ("attention_forward_mma_kernel<64>", "attention_forward_mma_kernel<64, true>")

# (stem, defines, names): the compiles, each the instantiations its pairs need and no more
BUILDS = {
    "adamw": ("adamw", (), ("adamw_kernel<float>", "adamw_kernel<float, true>")),
    "layernorm": ("layernorm", (), (
        "layernorm_forward_kernel<float, float>", "layernorm_forward_kernel<float, cllm_bf16>",
        "layernorm_backward_kernel<float, float>", "layernorm_backward_kernel<float, cllm_bf16>")),
    "gelu": ("gelu", (), (
        "gelu_forward_kernel<float, float, float>", "gelu_forward_kernel<float, cllm_bf16, float>",
        "gelu_forward_kernel<float, cllm_bf16, cllm_bf16>",
        "gelu_bias_backward_kernel<float, float, float>",
        "gelu_bias_backward_kernel<float, cllm_bf16, float>",
        "gelu_bias_backward_kernel<float, cllm_bf16, cllm_bf16>")),
    "dropout": ("dropout", (), (
        "dropout_bias_backward_kernel<float, float, float>",
        "dropout_bias_backward_kernel<float, CllmNoOutput, float>",
        "dropout_bias_backward_kernel<float, CllmNoOutput, cllm_bf16>",
        "dropout_bias_backward_kernel<double, double, double>",
        "dropout_bias_backward_kernel<double, CllmNoOutput, double>")),
    # the bf16 backward at D = 64 (GPT-2's head dim), without and with the distance bias
    "attention_backward": ("attention", (), tuple(
        f"attention_{k}_mma_kernel<64{b}>" for k in ("backward_dq", "backward_dkv", "backward")
        for b in ("", ", true", ", false, cllm_bf16", ", true, cllm_bf16"))),
    "attention_forward_8x2": ("attention", (), _FWD),
    "attention_forward_4x3": ("attention", FWD_4X3, _FWD),
    "attention_forward_4x2_m2": ("attention", FWD_4X2_M2, _FWD),
}


def _nvdisasm_or_skip() -> str:
    """The nvdisasm binary of the nvidia-cuda-nvdisasm wheel (found in the installed package,
    not on the PATH), after checking NVRTC is there to compile with."""
    _nvrtc_or_skip()
    try:
        files = importlib.metadata.files("nvidia-cuda-nvdisasm") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f.locate() for f in files if f.name == "nvdisasm"]
    if not found:
        pytest.skip("no nvdisasm: install the dev extra (the nvidia-cuda-nvdisasm wheel)")
    return str(found[0])


_SECTION_RE = re.compile(r"^\s*\.text\.(\S+):")
_LABEL_RE = re.compile(r"^\s*\.L_\w+:")
_INSTR_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# nvdisasm's note on an instruction, inside it before the ';': ptxas's spill code reads
# 'STL [R1+0x10], R3 (*"SpillRefill"*) ;'
_NOTE_RE = re.compile(r'\s*\(\*"[^"]*"\*\)')


def disassemble(nvdisasm: str, cubin: bytes) -> dict:
    """{mangled kernel name: [(opcode, [operands], predicated) or "label" ...]} of a CUBIN,
    in program order; "label" where a branch may land."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        r = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return parse_sass(r.stdout)


def parse_sass(text: str) -> dict:
    """disassemble's reading of nvdisasm's output."""
    out, cur = {}, None
    for line in text.splitlines():
        if m := _SECTION_RE.match(line):
            cur = out.setdefault(m.group(1), [])
        elif cur is None:
            continue
        elif _LABEL_RE.match(line):
            cur.append("label")
        elif m := _INSTR_RE.search(line):
            body = _NOTE_RE.sub("", m.group(3)).strip()
            # (.reuse: a hint to the operand cache, not part of the operand)
            ops = [o.strip().replace(".reuse", "") for o in body.split(",")] if body else []
            cur.append((m.group(2), ops, m.group(1) is not None))
    return out


FLOAT_OPS = re.compile(r"^(FFMA|FMUL|FADD|FMNMX|MUFU|DFMA|DMUL|DADD|DMNMX)(\.|$)")
# after a label (where paths meet), an unconditional jump or a call (the callee writes
# registers: the division's slow path) no operand's writer is known
_JUMP = re.compile(r"^(BRA|BRX|JMP|JMX|RET|EXIT|KILL)(\.|$)")
# instructions whose first operand is not a register they write
_NO_DEST = re.compile(r"^(ST|RED|LDGSTS|BAR|NOP|DEPBAR|LDGDEPBAR|MEMBAR|ERRBAR|YIELD|CCTL)")
_REG = re.compile(r"^R(\d+)$")


def _dest_registers(opcode, operands):
    """The registers an instruction writes (its first register operand after any predicate
    ones; 2 or 4 for 64- and 128-bit results, the tensor-core and ldmatrix fragments)."""
    if _NO_DEST.match(opcode):
        return []
    for op in operands:
        if re.fullmatch(r"!?U?P(\d+|T)", op):
            continue
        m = _REG.match(op.split(".")[0])
        if not m:
            return []
        width = 4 if (".128" in opcode or opcode.startswith("HMMA")
                      or (opcode.startswith("LDSM") and opcode.endswith(".4"))) else \
            2 if (".64" in opcode or ".WIDE" in opcode or opcode.startswith("D")
                  or (opcode.startswith("LDSM") and opcode.endswith(".2"))) else 1
        return [int(m.group(1)) + i for i in range(width)]
    return []


def _operand_kind(op, producer):
    """What a float instruction's operand is: the opcode of the float instruction that wrote
    it, "x" for a value no float instruction computed (a register another instruction wrote in
    the same basic block, a uniform register, a constant: which one ptxas chose is no matter of
    arithmetic), "?" for a register written before the block, "0" for RZ, or an immediate's
    value; with its sign and absolute-value modifiers."""
    sign = "-" if op.startswith("-") else ""
    core = op.lstrip("-")
    if core.startswith("|") and core.endswith("|"):
        sign, core = sign + "abs", core[1:-1]
    if m := _REG.match(core):
        return sign, producer.get(int(m.group(1)), "?")
    if core in ("RZ", "URZ"):
        return sign, "0"
    if re.match(r"^(UR\d+|c\[)", core):
        return sign, "x"
    return sign, core  # an immediate: its value


def float_ops(sass) -> list:
    """The float instructions' opcodes, in program order."""
    return [ins[0] for ins in sass if ins != "label" and FLOAT_OPS.match(ins[0])]


def signatures(sass) -> Counter:
    """Counter of (opcode, operand kinds) over the float instructions (see the module
    docstring); a commutative operation's operands sorted (FFMA: its two factors)."""
    out, producer, spilled = Counter(), {}, {}
    for ins in sass:
        if ins == "label" or ins[0].startswith("CALL") or (_JUMP.match(ins[0]) and not ins[2]):
            producer, spilled = {}, {}
            continue
        opcode, operands, predicated = ins
        dests = _dest_registers(opcode, operands)
        if FLOAT_OPS.match(opcode):
            kinds = [_operand_kind(o, producer) for o in operands[1:]]
            if not opcode.startswith("MUFU"):  # (FMNMX's third operand: its predicate)
                kinds = sorted(kinds[:2]) + kinds[2:]
            out[(opcode, tuple(kinds))] += 1
        if (moved := _moved_from(opcode, operands, producer, spilled)) is not None:
            for r, kind in zip(dests, moved):
                producer[r] = _maybe(predicated, producer.get(r), kind)
            continue
        _store_local(opcode, operands, predicated, producer, spilled)
        for r in dests:
            producer[r] = opcode if FLOAT_OPS.match(opcode) else "x"
        if 1 in dests:
            spilled = {}  # the stack pointer moved: [R1+off] names other slots
    return out


# a copy keeps what the value is, so that ptxas's register moves and spills (one build's
# allocation, not its arithmetic) are seen through: MOV Rd, Rs; IMAD.MOV.U32 Rd, RZ, RZ, Rs
# (ptxas's integer-unit move); STL [R1+off], Rs then LDL Rd, [R1+off] (a spill slot: R1 is
# the stack pointer, set from c[0x0][0x28] at the kernel's entry)
_SLOT = re.compile(r"^\[R1(?:\+(0x[0-9a-f]+|\d+))?\]$")
_SUBWORD = re.compile(r"\.[US](8|16)(\.|$)")


def _slot(address):
    m = _SLOT.match(address)
    return None if m is None else int(m.group(1) or "0", 0)


def _words(opcode):
    """How many 32-bit words a local load or store moves (0: part of one, .U8 ... .S16)."""
    return 0 if _SUBWORD.search(opcode) else 4 if ".128" in opcode else \
        2 if ".64" in opcode else 1


def _maybe(predicated, old, new):
    """What a register or slot holds after a write of `new` over `old`: a predicated write
    may not happen, so it is unknown ("?") unless both are alike."""
    return new if not predicated or old == new else "?"


def _store_local(opcode, operands, predicated, producer, spilled):
    """Records in `spilled` ({stack offset: kind}) what a local store writes: STL [R1+off]
    the kinds of its source registers (RZ: "0"); a part of a word, "x" (no float value); a
    store at any other local address (a local array indexed at run time) may overwrite any
    slot, which are then all unknown. (A generic ST never writes a spill slot: its address
    never leaves the stack frame.)"""
    if not re.match(r"^STL(\.|$)", opcode) or len(operands) != 2:
        return
    if (off := _slot(operands[0])) is None:
        spilled.clear()
        return
    words = _words(opcode)
    if words == 0:
        kinds, off = ["x"], off - off % 4
    elif m := _REG.match(operands[1]):
        kinds = [producer.get(int(m.group(1)) + i, "?") for i in range(words)]
    else:
        kinds = ["0" if operands[1] == "RZ" else "x"] * words
    for i, kind in enumerate(kinds):
        spilled[off + 4 * i] = _maybe(predicated, spilled.get(off + 4 * i), kind)


def _moved_from(opcode, operands, producer, spilled):
    """The kinds of the values a move or spill reload copies into its destination registers
    (a list, one per register), or None for any other instruction."""
    if opcode == "MOV" and len(operands) == 2:
        source = operands[1]
    elif opcode == "IMAD.MOV.U32" and len(operands) == 4 and operands[1:3] == ["RZ", "RZ"]:
        source = operands[3]
    elif re.match(r"^LDL(\.|$)", opcode) and len(operands) == 2 \
            and (off := _slot(operands[1])) is not None and (words := _words(opcode)):
        return [spilled.get(off + 4 * i, "?") for i in range(words)]
    else:
        return None
    m = _REG.match(source)
    if m is None:
        return None  # a constant or an immediate: "x", as any value no float op computed
    return [producer.get(int(m.group(1)), "?")]


def _unify(a, b) -> bool:
    """Two signatures alike where an operand whose writer one build cannot see ("?": written
    in another basic block, which depends on how ptxas laid the blocks out) may be anything."""
    def alike(x, y):
        return all(sa == sb and (wa == wb or "?" in (wa, wb)) for (sa, wa), (sb, wb) in zip(x, y))
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    swapped = b[1][1::-1] + b[1][2:]  # (the operands sorted: a "?" may sort apart)
    return alike(a[1], b[1]) or (not a[0].startswith("MUFU") and alike(a[1], swapped))


def _unmatched(a: Counter, b: Counter) -> list:
    """a's distinct signatures with no alike one (_unify) in b."""
    return [s for s in a if s not in b and not any(_unify(s, t) for t in b)]


def compare(check, a, b) -> list:
    """What differs between two instantiations' SASS under `check` ([] when they agree)."""
    fa, fb, sa, sb = float_ops(a), float_ops(b), signatures(a), signatures(b)
    ca, cb = Counter(fa), Counter(fb)
    bad = []
    if check == SEQUENCE and fa != fb:
        bad.append(f"float instruction sequences differ ({len(fa)} and {len(fb)} long; "
                   "if only ptxas's order changed, the counts below agree: check SCHEDULE)")
    if check in (SEQUENCE, SCHEDULE) and ca != cb:
        bad.append(f"float instruction counts differ: only in the first {dict(ca - cb)}, "
                   f"only in the second {dict(cb - ca)}")
    for x, y, which in ((sa, sb, "first"), (sb, sa, "second")):
        if miss := _unmatched(x, y):
            bad.append(f"signatures of the {which} with none alike in the other: {miss}")
    if check == M_TILES and cb - (ca + ca):
        bad.append(f"more than twice the one-tile build's instructions: {dict(cb - (ca + ca))}")
    if check == DQ_SCALE and (ca - cb or set(cb - ca) - {"FMUL.FTZ"}):
        bad.append(f"counts differ beyond the second's FMULs: only in the first "
                   f"{dict(ca - cb)}, only in the second {dict(cb - ca)}")
    return bad


_UNROLLED = "one build's loop unrolled more than the other's"
# (build, name), (build, name), check, why not a stronger check
PAIRS = [
    (("adamw", "adamw_kernel<float>"), ("adamw", "adamw_kernel<float, true>"), COPIES,
     "with and without the bf16 copy: the loop without it unrolled 4x, the divisors' "
     "reciprocals hoisted out of it"),
    (("layernorm", "layernorm_forward_kernel<float, float>"),
     ("layernorm", "layernorm_forward_kernel<float, cllm_bf16>"), COPIES,
     "the statistics with a float or a bf16 out: the output loop unrolled 16x and 4x"),
    (("layernorm", "layernorm_backward_kernel<float, float>"),
     ("layernorm", "layernorm_backward_kernel<float, cllm_bf16>"), SCHEDULE,
     "from a float or a bf16 dout: the same instructions, scheduled apart"),
    (("gelu", "gelu_forward_kernel<float, float, float>"),
     ("gelu", "gelu_forward_kernel<float, cllm_bf16, float>"), SCHEDULE,
     "from float or bf16 inputs: the same instructions, scheduled apart"),
    (("gelu", "gelu_forward_kernel<float, cllm_bf16, float>"),
     ("gelu", "gelu_forward_kernel<float, cllm_bf16, cllm_bf16>"), COPIES,
     "a float or a bf16 out (to_bf16 of the same values): " + _UNROLLED),
    (("gelu", "gelu_bias_backward_kernel<float, float, float>"),
     ("gelu", "gelu_bias_backward_kernel<float, cllm_bf16, float>"), COPIES,
     "from float or bf16 inputs: " + _UNROLLED),
    (("gelu", "gelu_bias_backward_kernel<float, cllm_bf16, float>"),
     ("gelu", "gelu_bias_backward_kernel<float, cllm_bf16, cllm_bf16>"), SCHEDULE,
     "a float dx or the bf16 one in place: the same instructions, scheduled apart"),
    *[(("dropout", f"dropout_bias_backward_kernel<{t}, {t}, {t}>"),
       ("dropout", f"dropout_bias_backward_kernel<{t}, CllmNoOutput, {d}>"), COPIES,
       "the column sums with or without an out (a bf16 dsum: its float values): the sums' "
       "loop unrolled more without the out")
      for t, d in (("float", "float"), ("float", "cllm_bf16"), ("double", "double"))],
    *[(("attention_backward", f"attention_backward_{k}mma_kernel<64{b}>"),
       ("attention_backward", f"attention_backward_{k}mma_kernel<64{b or ', false'}, cllm_bf16>"),
       check, "storing a float or a bf16 dqkv" + ("" if check == SEQUENCE
                                                   else ": the same instructions, scheduled apart"))
      for k, b, check in (("dq_", "", SCHEDULE), ("dq_", ", true", SCHEDULE),
                          ("dkv_", "", SEQUENCE), ("dkv_", ", true", SEQUENCE),
                          ("", "", SEQUENCE), ("", ", true", SCHEDULE))],
    *[(("attention_backward", f"attention_backward_dkv_mma_kernel<64{b}>"),
       ("attention_backward", f"attention_backward_mma_kernel<64{b}>"), DQ_SCALE,
       "atomic-dq's dK, dV against two-pass's (dkv_same_bits_as_two_pass): the atomic-dq "
       "kernel also scales its dQ products (FMULs more)") for b in ("", ", true")],
    *[(("attention_forward_8x2", n), ("attention_forward_4x3", n), SCHEDULE,
       "the D = 64 forward as 8 warps x 2 blocks and 4 x 3 (same_bits_as_8x2): the same "
       "counts, the blocks laid out apart") for n in _FWD],
    *[(("attention_forward_8x2", n), ("attention_forward_4x2_m2", n), M_TILES,
       "the D = 64 forward with two m-tiles per warp (same_bits_as_8x2): each tile's "
       "arithmetic, twice at most (the division's slow path and the setup are shared)")
      for n in _FWD],
]


def _full_name(source, name):
    """'adamw_kernel<float>' -> 'adamw_kernel<float,false>': a name expression with its
    defaulted template arguments written out, as the demangled kernel name has them."""
    base, targs = kernels.split_name_expression(name)
    tparams = kernels.kernel_signatures(source)[base][0]
    if not tparams:   # a plain kernel: its name as it is
        return base
    defaults = kernels.kernel_template_defaults(source)[base]
    return f"{base}<{','.join(targs + [defaults[t] for t in tparams[len(targs):]])}>"


def _sass(nvdisasm, source, stem, names, defines=(), compiler="nvrtc12") -> dict:
    """{name: SASS} of `names` compiled from `source` for sm_90 as CuPy would (its -ftz=true)
    with the compile-time settings `defines`, by one of the two compilers the kernels meet:
    "nvrtc12", NVRTC 12.9 (kernels.compile_source_nvrtc; cupy-cuda12x of the dev extra, as on
    CUDA 12 machines), or "nvcc13", CUDA 13's nvcc on the PATH (the GPU image's cupy-cuda13x
    compiles with NVRTC 13, the same compiler inside)."""
    if compiler == "nvrtc12":
        r = kernels.compile_source_nvrtc(source, f"{stem}.cu", names, "sm_90",
                                         kernels.define_options(defines))
        code = disassemble(nvdisasm, r["cubin"])
        return {n: code[r["lowered_names"][n]] for n in names}
    cubin = nvcc13_cubin(source, stem, names, kernels.define_options(defines))[0]
    code = {kernel_name(m): sass for m, sass in disassemble(nvdisasm, cubin).items()}
    return {n: code[_full_name(source, n)] for n in names}


@pytest.fixture(scope="module")
def sass():
    """sass(compiler, build, name): the SASS of one instantiation, each build compiled once
    per compiler (on first use: a selection of the pairs compiles only what it needs)."""
    nvdisasm = _nvdisasm_or_skip()

    @functools.cache
    def build(compiler, key):
        stem, defines, names = BUILDS[key]
        return _sass(nvdisasm, kernels.kernel_source(stem), stem, names, defines, compiler)
    return lambda compiler, key, name: build(compiler, key)[name]


@pytest.mark.parametrize("first,second,check,why", PAIRS,
                         ids=[f"{a[1]}|{b[0]}:{b[1]}" for a, b, _, _ in PAIRS])
@pytest.mark.parametrize("compiler", [
    "nvrtc12", pytest.param("nvcc13", marks=pytest.mark.ci_required("nvcc13"))])
def test_pair_does_the_same_float_arithmetic(sass, compiler, first, second, check, why):
    bad = compare(check, sass(compiler, *first), sass(compiler, *second))
    assert not bad, (f"{compiler}: {first[1]} ({first[0]}) and {second[1]} ({second[0]}), "
                     f"check {check!r} ({why}):\n" + "\n".join(bad))


def test_every_pair_is_listed_and_built():
    assert {b for p in PAIRS for b, _ in p[:2]} == set(BUILDS)
    for (b1, n1), (b2, n2), check, why in PAIRS:
        assert n1 in BUILDS[b1][2] and n2 in BUILDS[b2][2] and why
        assert check in (SEQUENCE, SCHEDULE, COPIES, M_TILES, DQ_SCALE)
    for stem, _, names in BUILDS.values():
        assert set(names) <= set(kernels.NAME_EXPRESSIONS[stem]), stem
    assert kernels.kernel_build("attention", _FWD[0])[1] != _FWD  # (default: the D = 64 module)
    for key, build in (("attention_forward_4x3", FWD_4X3),
                       ("attention_forward_4x2_m2", FWD_4X2_M2)):
        kernels.use_settings("attention", **dict(build))
        try:  # what the launcher compiles under those settings
            assert all(kernels.kernel_build("attention", n) == (build, _FWD) for n in _FWD), key
        finally:
            kernels.use_settings("attention")
        assert BUILDS[key] == ("attention", build, _FWD)


# AdamW with a planted change in the bf16-copy instantiation only: {name: (the line, its
# replacement)}
PLANTED = {
    # the weight decay's product rounded on its own (__fmul_rn is never contracted), where the
    # compiler fuses it into the subtraction
    "unfused": ("p -= lr_wd * mask[i] * p;",
                "if constexpr (BF16_COPY) p = p - __fmul_rn(lr_wd * mask[i], p); "
                "else p -= lr_wd * mask[i] * p;"),
    # a multiply-add the compiler does not form: (1 - beta2) g fused with g and beta2 v
    "fused": ("const T vi = beta2 * v[i] + one_minus_beta2 * (g * g);",
              "const T vi = BF16_COPY ? __fmaf_rn(one_minus_beta2 * g, g, beta2 * v[i]) "
              ": beta2 * v[i] + one_minus_beta2 * (g * g);"),
}


@pytest.mark.parametrize("compiler", [
    "nvrtc12", pytest.param("nvcc13", marks=pytest.mark.ci_required("nvcc13"))])
@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_the_check_sees_a_change_in_one_instantiation(plant, compiler):
    """The adamw pair's check (COPIES, the weakest) fails when one instantiation's arithmetic
    differs from the other's: the check can fail."""
    nvdisasm = _nvdisasm_or_skip()
    line, planted = PLANTED[plant]
    src = kernels.kernel_source("adamw")
    assert src.count(line) == 1
    code = _sass(nvdisasm, src.replace(line, planted), "adamw", BUILDS["adamw"][2],
                 compiler=compiler)
    assert compare(COPIES, *code.values()), plant


def test_signatures_see_through_register_moves_and_spills():
    """A value ptxas moves to another register (MOV, IMAD.MOV.U32) or spills and reloads
    (STL / LDL at [R1+off]) keeps the kind of the float instruction that computed it; a
    predicated copy, a reload of a slot stored in another block, or a copy past a label is
    unknown ("?"), and a load from elsewhere is "x"."""
    ffma = ("FFMA", ["R2", "R3", "R4", "R5"], False)
    def ex2_operand(*between):
        sig, = signatures([ffma, *between, ("MUFU.EX2", ["R9", "R8"], False)]) - \
            signatures([ffma])
        return sig[1][0][1]
    assert ex2_operand(("MOV", ["R8", "R2"], False)) == "FFMA"
    assert ex2_operand(("IMAD.MOV.U32", ["R8", "RZ", "RZ", "R2"], False)) == "FFMA"
    assert ex2_operand(("STL", ["[R1+0x10]", "R2"], False),
                       ("LDL", ["R8", "[R1+0x10]"], False)) == "FFMA"
    assert ex2_operand(("LDG.E", ["R3", "desc[UR4][R6.64]"], False),
                       ("STL.64", ["[R1+0x8]", "R2"], False),      # R2 and R3
                       ("LDL", ["R8", "[R1+0xc]"], False)) == "x"  # R3: loaded
    assert ex2_operand(("MOV", ["R8", "R2"], True)) == "?"         # @P0 MOV R8, R2
    assert ex2_operand(("LDL", ["R8", "[R1+0x20]"], False)) == "?"
    assert ex2_operand(("STL", ["[R1+0x10]", "R2"], False), "label",
                       ("LDL", ["R8", "[R1+0x10]"], False)) == "?"
    assert ex2_operand(("LDG.E", ["R8", "desc[UR4][R6.64]"], False)) == "x"
    # a predicated copy of what the register already holds is that; a predicated store
    # over another kind, a slot overwritten, RZ stored, part of a word: what each leaves
    assert ex2_operand(("MOV", ["R8", "R2"], False), ("MOV", ["R8", "R2"], True)) == "FFMA"
    stl = ("STL", ["[R1+0x10]", "R2"], False)
    ldl = ("LDL", ["R8", "[R1+0x10]"], False)
    assert ex2_operand(stl, ("STL", ["[R1+0x10]", "R3"], True), ldl) == "?"
    assert ex2_operand(stl, ("STL", ["[R1+0x10]", "R2"], True), ldl) == "FFMA"
    assert ex2_operand(stl, ("LDG.E", ["R7", "desc[UR4][R6.64]"], False),
                       ("STL", ["[R1+0x10]", "R7"], False), ldl) == "x"
    assert ex2_operand(stl, ("STL", ["[R1+0x10]", "RZ"], False), ldl) == "0"
    assert ex2_operand(stl, ("STL.U8", ["[R1+0x12]", "R7"], False), ldl) == "x"
    assert ex2_operand(stl, ("LDL.U16", ["R8", "[R1+0x10]"], False)) == "x"
    # the slot of a 64-bit reload's second word, stored on its own
    assert ex2_operand(("STL", ["[R1+0x14]", "R2"], False),
                       ("LDL.64", ["R8", "[R1+0x10]"], False),
                       ("MOV", ["R8", "R9"], False)) == "FFMA"
    # a store at a run-time local address may be to any slot; R1 moved: other slots
    assert ex2_operand(stl, ("STL", ["[R6]", "R7"], False), ldl) == "?"
    assert ex2_operand(stl, ("VIADD", ["R1", "R1", "0xfffffff0"], False), ldl) == "?"


def test_disassembly_reads_spill_code():
    """nvdisasm writes a note inside a spill's instruction ('(*"SpillRefill"*)' before the
    ';'): the operands are read without it, so the spill slots are seen."""
    code = parse_sass("""
        .text._Z1kPf:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*1c90*/                   STL [R1+0x34], R17                 (*"SpillRefill"*);
        /*20b0*/                   LDL.64 R28, [R1+0x30]              (*"SpillRefill"*);
        /*21a0*/              @P0  STL [R1+0x40], RZ                  (*"SpillRefill"*);
    """)["_Z1kPf"]
    assert code[1:] == [("STL", ["[R1+0x34]", "R17"], False),
                        ("LDL.64", ["R28", "[R1+0x30]"], False),
                        ("STL", ["[R1+0x40]", "RZ"], True)]


@pytest.mark.parametrize("compiler", [
    "nvrtc12", pytest.param("nvcc13", marks=pytest.mark.ci_required("nvcc13"))])
def test_spill_slots_are_seen_in_a_spilling_kernel(sass, compiler):
    """The D = 64 forward with the bias spills (76 bytes under nvcc 13): its spill code, as
    disassemble reads it, is registers and slots [R1+off] (ten at least) and nothing else."""
    code = sass(compiler, "attention_forward_8x2", _FWD[1])
    local = [ins for ins in code if ins != "label" and re.match(r"^(LDL|STL)", ins[0])]
    assert all(re.fullmatch(r"R\d+|RZ|\[R\d+(\+0x[0-9a-f]+)?\]", o)
               for ins in local for o in ins[1]), local
    assert sum(_slot(o) is not None for ins in local for o in ins[1]) >= 10, local


def test_the_cubin_is_whole():
    """compile_source_nvrtc's CUBIN is the whole ELF file (CuPy's getCUBIN drops its last
    byte: kernels._whole_cubin puts it back), which nvdisasm reads."""
    _nvdisasm_or_skip()
    cubin = kernels.compile_source_nvrtc(kernels.kernel_source("adamw"), "adamw.cu",
                                         BUILDS["adamw"][2], "sm_90")["cubin"]
    assert kernels._whole_cubin(cubin) == cubin == kernels._whole_cubin(cubin[:-1])
    for bad in (cubin[:-2], b"PTX text"):
        with pytest.raises(ValueError, match="NVRTC's CUBIN"):
            kernels._whole_cubin(bad)


def _conversions(code):
    return [ins[0] for ins in code if ins != "label" and re.match(r"^F2F", ins[0])]


@pytest.mark.parametrize("compiler", [
    "nvrtc12", pytest.param("nvcc13", marks=pytest.mark.ci_required("nvcc13"))])
def test_bf16_cast_keeps_denormals_under_ftz(compiler):
    """CuPy compiles with -ftz=true, which flushes float arithmetic's denormals, but
    `cllm_float_to_bf16_bits` is an inline `cvt.rn.bf16.f32` without .ftz, so the cast kernel's
    conversion keeps them, as the NumPy reference and PyTorch do: in the machine code it is an
    F2F/F2FP with no .FTZ, and the widening back is integer code (no conversion at all). The
    same asm with .ftz planted shows as F2F.FTZ: the check can fail."""
    nvdisasm = _nvdisasm_or_skip()
    src, names = kernels.kernel_source("cast"), kernels.NAME_EXPRESSIONS["cast"]
    code = _sass(nvdisasm, src, "cast", names, compiler=compiler)
    narrow = _conversions(code["float_to_bf16_kernel"])
    assert narrow and not any(".FTZ" in op for op in narrow), narrow
    assert _conversions(code["bf16_to_float_kernel"]) == []
    cvt = '"cvt.rn.bf16.f32 %0, %1;"'
    assert src.count(cvt) == 1
    planted = _sass(nvdisasm, src.replace(cvt, '"cvt.rn.ftz.bf16.f32 %0, %1;"'), "cast", names,
                    compiler=compiler)
    assert any(".FTZ" in op for op in _conversions(planted["float_to_bf16_kernel"]))
