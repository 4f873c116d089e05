"""Run every CUDA launcher in cllm_gpu/ops with a fake CuPy (NumPy-backed arrays) and a
fake kernel that checks each launch against the kernel's C signature parsed from kernels_cu/:
argument count, scalar numpy types (int -> np.int32, long long -> np.int64, T -> dtype),
pointer args are arrays of the right dtype, grid/block limits. Needs no GPU and no CuPy: run in
its own process (it installs a fake `cupy` module) by tests/test_launch_signatures.py.
CuPy passes a Python int as long long and a float as double, so a scalar of the wrong numpy type
is a silent garbage argument on the GPU; this catches it on any CPU."""
import re, sys, types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

class FakeArr(np.ndarray):
    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

def wrap(a):
    return np.asarray(a).view(FakeArr)

fake = types.ModuleType("cupy")
fake.ndarray = FakeArr
fake.empty = lambda shape, dtype=np.float32: wrap(np.full(shape, np.nan, dtype=dtype) if np.dtype(dtype).kind == "f" else np.empty(shape, dtype))
fake.zeros = lambda shape, dtype=np.float32: wrap(np.zeros(shape, dtype))
fake.ascontiguousarray = lambda a, dtype=None: wrap(np.ascontiguousarray(a, dtype=dtype))
fake.asarray = lambda a, dtype=None: wrap(np.asarray(a, dtype=dtype))
sys.modules["cupy"] = fake

from cllm_gpu import kernels
from cllm_gpu.ops import _common, _cuda
_common._cupy = fake

SIG = {}
for stem in kernels.NAME_EXPRESSIONS:
    SIG.update(kernels.kernel_signatures(kernels.kernel_source(stem)))
LB = {m.group(2): int(m.group(1)) if m.group(1).isdigit() else None for stem in kernels.NAME_EXPRESSIONS
      for m in re.finditer(r"__launch_bounds__\((\w+)\)\s*(\w+)", kernels.kernel_source(stem))}
CT = {"float": np.float32, "double": np.float64}
launches = []

class FakeKernel:
    def __init__(self, stem, name):
        assert name in kernels.NAME_EXPRESSIONS[stem], name
        self.name = name
        base, targs = kernels.split_name_expression(name)
        self.tparams, self.params = SIG[base]
        self.tmap = dict(zip(self.tparams, targs))
    def __call__(self, grid, block, args):
        assert isinstance(grid, tuple) and isinstance(block, tuple), (self.name, grid, block)
        assert len(args) == len(self.params), (self.name, len(args), self.params)
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        b = tuple(int(x) for x in block) + (1,) * (3 - len(block))
        assert all(x >= 1 for x in g), (self.name, "empty grid", grid)
        assert g[0] < 2**31 and g[1] <= 65535 and g[2] <= 65535, (self.name, grid)
        assert b[0] * b[1] * b[2] <= 1024 and b[0] % 32 == 0, (self.name, block)
        for a, p in zip(args, self.params):
            words = p.replace("*", " * ").split()
            pname = words[-1]
            ty = [w for w in words[:-1] if w not in ("const",)]
            if "*" in ty:
                base = ty[0]
                assert isinstance(a, FakeArr), (self.name, pname, type(a))
                assert a.flags.c_contiguous, (self.name, pname)
                want = {"int": np.int32, "double": np.float64, "float": np.float32,
                        "cllm_bf16": np.uint16}.get(
                    self.tmap.get(base, base))
                assert a.dtype == want, (self.name, pname, a.dtype, want)
            else:
                base = " ".join(ty)
                base = self.tmap.get(base, base)
                want = {"int": np.int32, "long long": np.int64, "float": np.float32,
                        "double": np.float64}[base]
                assert type(a) is want, (self.name, pname, type(a), want)
        launches.append((self.name, g, b))

_cuda.kernel = lambda stem, name: FakeKernel(stem, name)

from cllm_gpu import ops
from cllm_gpu.ops.grad_norm import clip_factor
rng = np.random.default_rng(0)
def dev(*shape, dtype=np.float32):
    return wrap(rng.normal(size=shape).astype(dtype))

for dt in (np.float32, np.float64):
    x = dev(37, 45, dtype=dt)
    ops.gelu_forward(x); ops.gelu_backward(dev(37, 45, dtype=dt), x)
    w, b = dev(45, dtype=dt), dev(45, dtype=dt)
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    ops.layernorm_backward(dev(37, 45, dtype=dt), x, w, mean, rstd, fake.zeros(45, dt), fake.zeros(45, dt))
    for V in (1, 1001, 1004, 50257, 50304):
        logits = dev(13, V, dtype=dt)
        t = wrap(rng.integers(-1, V, size=13).astype(np.int64))
        ops.softmax_xent(logits, t, 1 / 13, dlogits=logits)
        ops.softmax_xent(logits, t, 1 / 13, need_grad=False)
    P = 10_007
    p, g, m, v = dev(P, dtype=dt), dev(P, dtype=dt), dev(P, dtype=dt), fake.zeros(P, dt)
    norm = ops.grad_norm(g)
    ops.adamw_update(p, g, m, v, fake.zeros(P, dt), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, grad_scale=clip_factor(norm, 1.0))
    ops.adamw_update(p, g, m, v, fake.zeros(P, dt), 1e-3, 0.9, 0.95, 1e-8, 0.1, 2, grad_scale=0.5)
    # per-step values from a device buffer (the CUDA-graph path): lr, wd and step unused
    ops.adamw_update(p, g, m, v, fake.zeros(P, dt), None, 0.9, 0.95, 1e-8, None, None,
                     grad_scale=clip_factor(norm, 1.0), hyper=fake.zeros(4, np.float64))
    for C in (19, 130, 768):
        V, B, T = 50, 3, 7
        idx = wrap(rng.integers(0, V, size=(B, T)))
        wte, wpe = dev(V, C, dtype=dt), dev(T + 2, C, dtype=dt)
        ops.embedding_forward(idx, wte, wpe)
        ops.embedding_backward(dev(B, T, C, dtype=dt), idx, fake.zeros((V, C), dt), fake.zeros((T + 2, C), dt))
for D in kernels.ATTENTION_HEAD_DIMS:
    for T in (1, 45, 255):
        qkv = dev(2, T, 3 * 2 * D)
        out, lse = ops.attention_forward(qkv, 2)
        ops.attention_backward(dev(2, T, 2 * D), qkv, out, lse, 2)
        # precision="bf16": the tensor-core kernels (the fp32 ones for head dims without them)
        out, lse = ops.attention_forward(qkv, 2, precision="bf16")
        ops.attention_backward(dev(2, T, 2 * D), qkv, out, lse, 2, precision="bf16")
from cllm_gpu.ops import cast
x = dev(37, 45)
ops.gelu_forward(x, out=fake.empty((37, 45), np.uint16), bias=dev(45), bf16_out=True)
ops.gelu_forward(x, bias=dev(45))
ops.layernorm_forward(x, dev(45), dev(45), out=fake.empty((37, 45), np.uint16), bf16_out=True)
h = cast.to_bf16(dev(7, 33))

# ops.gemm's CUDA path against a stand-in cublasGemmEx that reads the raw pointers exactly as
# cuBLAS does (column-major, leading dimensions, host alpha/beta of the compute type): checks
# the pointers, dtypes, transposes and leading dimensions gemm_cuda hands over, end to end.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulator import fake_cublas  # the one cublasGemmEx stand-in, shared with the emulator
gemm_calls = fake_cublas.calls
fake_cublas.install_modules()
fake.cuda = types.SimpleNamespace(device=types.SimpleNamespace(get_cublas_handle=lambda: 0))
for (M, N, K) in ((5, 7, 3), (1, 9, 4), (33, 2, 17)):
    for ta in (False, True):
        for tb in (False, True):
            for dt in (np.float32, np.float64, "bf16"):
                a = rng.normal(size=(K, M) if ta else (M, K)).astype(np.float32)
                b = rng.normal(size=(N, K) if tb else (K, N)).astype(np.float32)
                if dt == "bf16":
                    A, B = wrap(cast.bf16_bits(a)), wrap(cast.bf16_bits(b))
                    a, b = cast.round_bf16(a), cast.round_bf16(b)
                    odt = np.float32
                else:
                    a, b = a.astype(dt), b.astype(dt)
                    A, B, odt = wrap(a), wrap(b), dt
                want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
                out = ops.gemm(A, B, trans_a=ta, trans_b=tb)
                assert out.dtype == odt and out.shape == (M, N), (out.dtype, out.shape)
                np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
                c0 = rng.normal(size=(M, N)).astype(odt)
                acc = wrap(c0.copy())
                ops.gemm(A, B, acc, trans_a=ta, trans_b=tb, accumulate=True)
                np.testing.assert_allclose(acc, want + c0, rtol=1e-5, atol=1e-5)
print(len(gemm_calls), "gemm calls checked against a column-major cuBLAS stand-in")
cast.from_bf16(h)
names = sorted({l[0] for l in launches})
missing = [f"{s}:{n}" for s in kernels.NAME_EXPRESSIONS for n in kernels.NAME_EXPRESSIONS[s] if n not in names]
print(len(launches), "launches checked;", len(names), "distinct kernels; never launched:", missing)
sys.exit(1 if missing else 0)
