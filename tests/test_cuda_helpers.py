"""The CUDA launchers' argument helpers (cllm_gpu/ops/_cuda.py) that no launcher reaches
through a public op: each public function refuses a dtype other than float32 / float64 first,
a dimension past int32 needs arrays of more than 2**31 elements, and every launcher passes
colsum_finalize one or two outputs. The module is plain Python (CuPy is imported inside the
functions that allocate), so they are checked here, on any machine, by calling them directly
(h27k's coverage of the emulator runs found them never run)."""
import numpy as np
import pytest

from cllm_gpu.ops import _cuda


@pytest.mark.parametrize("dtype,name", [(np.float32, "float"), (np.float64, "double")])
def test_ctype_names_the_kernels_float_types(dtype, name):
    assert _cuda.ctype(dtype) == name


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.uint16])
def test_ctype_refuses_other_dtypes(dtype):
    with pytest.raises(ValueError, match=f"support float32 and float64, got {np.dtype(dtype)}$"):
        _cuda.ctype(dtype)


@pytest.mark.parametrize("x", [0, -2**31, 2**31 - 1, np.int64(2**31 - 1)])
def test_i32_passes_what_fits(x):
    v = _cuda.i32(x)
    assert type(v) is np.int32 and int(v) == int(x)


@pytest.mark.parametrize("x", [2**31, -2**31 - 1, 2**40, np.int64(2**31)])
def test_i32_refuses_what_does_not_fit(x):
    with pytest.raises(ValueError, match=f"value {int(x)} does not fit in a 32-bit kernel"):
        _cuda.i32(x)


@pytest.mark.parametrize("outputs", [0, 3])
def test_colsum_finalize_refuses_other_output_counts_before_any_launch(outputs, monkeypatch):
    looked_up = []
    monkeypatch.setattr(_cuda, "kernel", lambda stem, name: looked_up.append(name) or
                        (lambda *args, **kw: None))
    partial = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=f"one or two outputs, got {outputs}"):
        _cuda.colsum_finalize("gelu", partial, 4, 3, *[np.zeros(4, np.float32)] * outputs)
    assert looked_up == []
