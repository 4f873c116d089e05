"""Backend choice: "numpy" (any CPU), "cuda" (CuPy + an NVIDIA GPU) or "auto"."""
import os
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def enable_tf32() -> None:
    """Let cuBLAS run float32 matrix products on tensor cores in TF32 (10-bit mantissa inputs,
    fp32 accumulation): several times the fp32 rate on A100/H100. CuPy reads CUPY_TF32 once, at
    its first float32 matmul, so call this before any model is built. Opt-in: the GPU suite's
    fp32 tolerances assume full fp32 products."""
    os.environ["CUPY_TF32"] = "1"


def cuda_available() -> bool:
    try:
        import cupy
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def resolve_backend(name: str):
    """Return (backend_name, array_module)."""
    if not isinstance(name, str) or name not in ("numpy", "cuda", "auto"):
        raise ConfigError(f"backend must be 'numpy', 'cuda' or 'auto', got {name!r}")
    if name == "auto":
        name = "cuda" if cuda_available() else "numpy"
    if name == "cuda":
        if not cuda_available():
            raise ConfigError("backend 'cuda' requested but CuPy or a CUDA GPU is not available "
                              "(install the cuda12/cuda13 extra, check nvidia-smi)")
        import cupy
        return "cuda", cupy
    return "numpy", np


# Dense peaks (no sparsity) from NVIDIA's data sheets, by GPU name: the SXM boards ('NVIDIA
# H100 80GB HBM3', 'NVIDIA H200', 'NVIDIA A100-SXM4-40GB'; the A100's PCIe card has the same
# peaks) and the H100 PCIe card, which clocks lower (51 / 756 sparse / 1,513 sparse).
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5},
               "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
               "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}


def device_peaks(device_name: str) -> dict | None:
    """PEAK_TFLOPS's entry for a GPU name (the longest key it contains); None for a GPU not
    there, and for the NVL cards (H100 NVL, H200 NVL: lower clocks than the SXM boards whose
    names they contain, their peaks not in the table), so that no MFU is shown against a
    wrong peak."""
    if "NVL" in device_name:
        return None
    keys = [k for k in PEAK_TFLOPS if k in device_name]
    return PEAK_TFLOPS[max(keys, key=len)] if keys else None


def peak_tflops(device_name: str, kind: str) -> float | None:
    """The data-sheet peak of a GPU (by name) for kind "fp32" (no tensor cores), "tf32" or
    "bf16"; None for a GPU device_peaks does not know."""
    peaks = device_peaks(device_name)
    return peaks[kind] if peaks else None


def cuda_device_name(device_id: int | None = None) -> str:
    """The CUDA device's name as it reports it (the current device's by default); CuPy gives
    cudaDeviceProp.name as bytes, another CuPy as str."""
    import cupy
    if device_id is None:
        device_id = cupy.cuda.Device().id
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def device_peak_tflops(kind: str) -> float | None:
    """peak_tflops of the current CUDA device."""
    return peak_tflops(cuda_device_name(), kind)


def describe_backend(name: str) -> str:
    if name == "cuda":
        import cupy
        dev = cupy.cuda.Device()
        return (f"CUDA backend on GPU {dev.id}: {cuda_device_name(dev.id)} "
                f"(CuPy {cupy.__version__})")
    from .ops.host_threads import ENV_VAR, host_threads
    n = host_threads()
    return (f"NumPy backend on the CPU (numpy {np.__version__}; {n} thread{'s' * (n != 1)}, "
            f"{ENV_VAR} to change; no CUDA GPU in use)")


MEMINFO, CGROUP_ROOT, SELF_CGROUP = "/proc/meminfo", "/sys/fs/cgroup", "/proc/self/cgroup"
# (where the hierarchy is mounted, /proc/self/cgroup's controller field, limit file, usage
# file, memory.stat's page-cache key) for cgroup v2 and v1
_CGROUP_LAYOUTS = (("", "", "memory.max", "memory.current", "file"),
                   ("/memory", "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                    "total_cache"))


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _cgroup_room(host: int) -> int:
    """`host` capped by the memory limit of this process's cgroup and of each cgroup above it
    (v2 or v1: a container's own namespace shows its limit at the root; a Slurm job or systemd
    unit on a bare host sits lower in the tree); unreadable or unlimited levels cap nothing."""
    try:
        own = [line.split(":", 2) for line in _read(SELF_CGROUP).splitlines()]
    except OSError:
        own = []
    for mount, controller, limit_file, usage_file, cache_key in _CGROUP_LAYOUTS:
        root = CGROUP_ROOT.rstrip("/") + mount
        rel = next((f[2].strip() for f in own if len(f) == 3
                    and controller in f[1].split(",")), "/")
        d = root + rel.rstrip("/")
        while True:
            try:
                limit = _read(f"{d}/{limit_file}").strip()
                if limit != "max":
                    # the usage counts the page cache (the data files just read), which the
                    # kernel gives back under the limit: counted as used, it would refuse
                    # models that fit
                    stat = dict(line.split() for line in _read(f"{d}/memory.stat").splitlines()
                                if line.count(" ") == 1)
                    used = int(_read(f"{d}/{usage_file}")) - int(stat.get(cache_key, 0))
                    host = min(host, int(limit) - used)
            except (OSError, ValueError):
                pass
            if len(d) <= len(root):
                break
            d = d.rsplit("/", 1)[0]
    return host


def available_memory(xp) -> int | None:
    """Bytes a new allocation may still take: on the GPU the device's free memory plus what
    CuPy's pool holds unused; on the host MemAvailable plus free swap, capped by the cgroup
    limits (memory.max) over this process. None where it cannot be read (not Linux): no check
    is made then."""
    if xp is not np:
        try:
            free, _ = xp.cuda.runtime.memGetInfo()
            return int(free) + int(xp.get_default_memory_pool().free_bytes())
        except Exception:  # a stand-in CuPy without these, a driver that will not say
            return None
    try:
        info = dict(line.split(":", 1) for line in _read(MEMINFO).splitlines())
        host = (int(info["MemAvailable"].split()[0]) + int(info["SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return _cgroup_room(host)


@dataclass(frozen=True)
class HostMemory:
    """The host memory available (available_memory(np)) to `ranks` ranks of one host, read
    before any of them allocated: what the memory checks of a data-parallel set-up compare
    with, the same figures on every rank. share: one rank's part."""
    free: int
    ranks: int

    @property
    def share(self) -> int:
        return self.free // self.ranks


def format_bytes(n: int) -> str:
    """A memory figure for a user's line: GB at a gigabyte or more, else MB, else kB (one
    decimal in GB printed a tiny model's needs and a small budget as "0.0 GB")."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if round(n / size, 1) >= 1:  # as printed: 999,999,999 is "1.0 GB", not "1,000.0 MB"
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"
