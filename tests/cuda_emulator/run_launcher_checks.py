"""The CUDA launchers' argument checks (cllm_gpu/ops/*.py) on inputs their kernels cannot take,
on the emulator's fake CuPy with the real kernels: each input is refused with a ValueError (or
the TypeError of a wrong kind of argument) before any launch, where before it was launched into
a race, read a pointer as the wrong type, or passed an int32 loop counter past 2**31 - 1.

    python tests/cuda_emulator/run_launcher_checks.py [CHECK ...]

Prints one JSON line {check: "ok" | "skip: ..." | "FAIL: ..."}; tests/test_launcher_checks_
emulated.py runs it once and has one test per check. Installs a fake `cupy`: run it in a
process of its own.

The int32 limits: a kernel loop `for (int i = start; i < n; i += step)` (start < step) computes
i + step from its last i <= n - 1, which passes 2**31 - 1 (signed overflow: a negative index on
the GPU) unless n <= 2**31 - step. Those sizes (one row of ~2**31 elements, 4 to 8.6 GB) are
given as sparse arrays (nothing touched) with the kernels replaced by a recorder, so the check
sees whether a launch happened without running it: the largest size allowed is launched, the
next one is refused."""
import contextlib
import json
import sys
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from cuda_emulator import fake_cupy  # noqa: E402

cp = fake_cupy.install()

import numpy as np  # noqa: E402

from cllm_gpu.ops import (DropoutKey, attention_forward, dropout,  # noqa: E402
                          embedding_backward, gelu_backward,
                          gelu_forward, layernorm_backward, layernorm_forward,
                          residual_layernorm_forward, softmax_xent)
from cllm_gpu.ops import _cuda  # noqa: E402

F32 = np.float32
INT32_MAX = 2**31 - 1


class Skip(Exception):
    pass


def dev(a):
    return cp.asarray(np.asarray(a))


def refused(fn, exc, match):
    """fn() raises `exc` whose message contains `match`, with no kernel launched."""
    before = len(fake_cupy.launches)
    try:
        fn()
    except exc as e:
        assert match in str(e), f"raised {type(e).__name__}: {e}"
        assert len(fake_cupy.launches) == before, "launched before refusing"
        return
    raise AssertionError(f"not refused (expected {exc.__name__}: ...{match}...)")


@contextlib.contextmanager
def recorded_launches():
    """The kernels replaced by a recorder (list of kernel names): a launch at a size the
    emulator cannot run in reasonable time is seen, not run."""
    names = []

    class Recorder:
        def __init__(self, stem, name):
            self.name, self.max_dynamic_shared_size_bytes = name, 0

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            names.append(self.name)

    saved = _cuda.kernel
    _cuda.kernel = Recorder
    try:
        yield names
    finally:
        _cuda.kernel = saved


def sparse(shape, dtype=F32):
    try:
        return fake_cupy.sparse_zeros(shape, dtype)
    except (OSError, ValueError) as e:  # no address space for a few GB of virtual memory
        raise Skip(f"sparse {shape} mapping refused: {e}")


def check_residual_layernorm_dropout_key():
    """p > 0: the key is checked as dropout() checks it. The kernel reads key.step through a
    `const double*`: a device int64 or float32 step was passed as it was (on a GPU its bits
    read as a double: another step's mask, silently; the emulator's argument check refused it
    with a TypeError at the launch), and key=None failed with an AttributeError."""
    rng = np.random.default_rng(0)
    N, C = 4, 32
    x, y = (dev(rng.normal(size=(N, C)).astype(F32)) for _ in range(2))
    w, b = dev(np.ones(C, F32)), dev(np.zeros(C, F32))

    def run(key):
        return residual_layernorm_forward(x, y, w, b, 1e-5, cp.zeros((N, C), F32),
                                          cp.zeros((N, C), F32), None, None, p=0.25, key=key)
    for step in (np.array([3]), np.array([3.0], F32)):
        refused(lambda: run(DropoutKey(1, dev(step), 2)), ValueError,
                f"key.step: expected dtype float64, got {step.dtype}")
    refused(lambda: run(None), TypeError, "key: expected a DropoutKey, got NoneType")
    run(DropoutKey(1, dev(np.array([3.0])), 2))   # the trainer's form runs


def check_layernorm_backward_dweight_is_dbias():
    """dweight and dbias are both finalized by one launch, one block row each: the same array
    for both (or overlapping ones) raced there (the emulator's race check: a read-after-write
    between blocks of cllm_colsum_finalize_kernel; on a GPU a lost update)."""
    rng = np.random.default_rng(1)
    N, C = 16, 32
    x, d = (dev(rng.normal(size=(N, C)).astype(F32)) for _ in range(2))
    w = dev(rng.normal(size=C).astype(F32))
    _, mean, rstd = layernorm_forward(x, w, cp.zeros(C, F32))
    g = cp.zeros(C, F32)
    for dbias in (g, g[:]):
        refused(lambda: layernorm_backward(d, x, w, mean, rstd, g, dbias), ValueError,
                "dbias: must not overlap dweight")


def launched_or_refused(case: str, ok: bool, unit: str, limit: int, launch):
    """launch() at a size up to the limit (ok) launches kernels; past it, it is refused with a
    ValueError naming the unit and the limit, before any launch."""
    with recorded_launches() as names:
        try:
            launch()
        except ValueError as e:
            assert not ok, f"{case} refused: {e}"
            assert unit in str(e) and str(limit) in str(e), e
            assert not names, f"{case}: launched {names} before refusing"
        else:
            assert ok, f"{case} was launched: {names}"
            assert names, f"{case}: nothing launched"


def check_softmax_xent_columns_past_the_int32_loop():
    """A row is walked by `for (int i = tid; i < V; i += 512)` (the ignored rows' zeros; the
    unaligned pass too): V up to 2**31 - 512 launches, one column more is refused."""
    limit = 2**31 - 512
    t = dev(np.array([-1], np.int32))
    for V, ok in ((limit, True), (limit + 1, False), (INT32_MAX, False)):
        L = sparse((1, V))
        launched_or_refused(f"V = {V}", ok, "columns", limit,
                            lambda: softmax_xent(L, t, 1.0, dlogits=L))
        del L


def check_embedding_backward_positions_past_the_int32_loop():
    """The dwte kernel walks the B * T positions by `for (int base = 0; base < N; base += 32)`:
    N up to 2**31 - 32 launches, one position more is refused (a negative base read idx[base
    + lane] out of bounds)."""
    limit = 2**31 - 32
    for N, ok in ((limit, True), (limit + 1, False)):
        idx, dout = sparse((1, N), np.int32), sparse((1, N, 1))
        dwte = cp.zeros((4, 1), F32)
        launched_or_refused(f"N = {N}", ok, "positions", limit,
                            lambda: embedding_backward(dout, idx, dwte, None))
        del idx, dout


def check_layernorm_forward_channels_past_the_int32_loop():
    """A warp walks its row by `for (int c = lane; c < C; c += 32)` (both forwards): C up to
    2**31 - 32 launches, one channel more is refused."""
    limit = 2**31 - 32
    for C, ok in ((limit, True), (limit + 1, False)):
        x, out = sparse((1, C)), sparse((1, C))
        w, b = sparse((C,)), sparse((C,))
        y, s = sparse((1, C)), sparse((1, C))
        for name, run in (
                ("layernorm_forward", lambda: layernorm_forward(x, w, b, out=out)),
                ("residual_layernorm_forward",
                 lambda: residual_layernorm_forward(x, y, w, b, 1e-5, s, out, None, None))):
            launched_or_refused(f"{name}: C = {C}", ok, "channels", limit, run)
        del x, out, w, b, y, s


def check_gelu_of_a_0d_array():
    """A 0-d x is one element of a row of width 1 (the NumPy path computes it, and a bias of
    shape (1,) was accepted by the checks); the launchers took x.shape[-1] for the kernels' row
    width and failed with an IndexError (the NumPy backward's bias sum too)."""
    x, dout, bias = np.array(0.75, F32), np.array(1.5, F32), np.array([0.25], F32)
    for b in (None, bias):
        db_host, db_dev = (None, None) if b is None else (np.zeros(1, F32), cp.zeros(1, F32))
        b_dev = None if b is None else dev(b)
        for got, want in ((gelu_forward(dev(x), bias=b_dev), gelu_forward(x, bias=b)),
                          (gelu_backward(dev(dout), dev(x), bias=b_dev, dbias=db_dev),
                           gelu_backward(dout, x, bias=b, dbias=db_host)),
                          (db_dev, db_host)):
            if want is None:
                continue
            got = cp.asnumpy(got)
            assert got.shape == want.shape, (got.shape, want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-6)


def check_dropout_int_step_outside_uint32():
    """An int step is passed to the kernels as a float64 they convert to the 32-bit Philox key
    word: -1 or 2**32 launched (a double -> unsigned conversion out of range, undefined: some
    mask) where the NumPy path raised OverflowError. Refused on both now, before any launch."""
    x = dev(np.ones((4, 8), F32))
    for step in (-1, 2**32):
        key = DropoutKey(1, step, 2)
        refused(lambda: dropout(x, 0.5, key), ValueError, "key.step: expected 0 .. 2**32 - 1")
        refused(lambda: residual_layernorm_forward(
            x, x, cp.ones(8, F32), cp.zeros(8, F32), 1e-5, cp.zeros((4, 8), F32),
            cp.zeros((4, 8), F32), None, None, p=0.5, key=key),
            ValueError, "key.step: expected 0 .. 2**32 - 1")


def check_int_arguments_are_ints():
    """attention's n_head and softmax_xent's vocab_size: True ran as one head and 5.5 as a
    vocabulary of 5 (the launchers' int32 arguments truncate), 2.0 heads failed with a
    KeyError naming kernel <16.0>; the NumPy path raised TypeErrors of its own. One TypeError
    on both backends now."""
    q = dev(np.ones((2, 5, 96), F32))
    for n_head in (True, 2.0):
        refused(lambda: attention_forward(q, n_head), TypeError,
                f"n_head: expected an int, got {n_head!r}")
    L, t = dev(np.zeros((4, 8), F32)), dev(np.zeros(4, np.int32))
    for v in (5.5, 6.0, True):
        refused(lambda: softmax_xent(L, t, 1.0, vocab_size=v), TypeError,
                f"vocab_size: expected an int, got {v!r}")
    attention_forward(q, np.int64(2))                  # NumPy ints are ints
    softmax_xent(L, t, 1.0, vocab_size=np.int32(6))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items()
          if name.startswith("check_")}


def main(names):
    results = {}
    for name in names or CHECKS:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Skip as e:
            results[name] = f"skip: {e}"
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            results[name] = f"FAIL: {type(e).__name__}: {str(e)[:400]} | " + " / ".join(tb[-4:])
    print(json.dumps(results))
    return 0 if all(v == "ok" or v.startswith("skip") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
