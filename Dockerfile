# cllm-gpu: GPU pretraining image.
#
#   docker build -t cllm-gpu .
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/ckpt:/checkpoints" \
#       cllm-gpu train --data /data/tinyshakespeare --out /checkpoints/run1
#
# See docs/docker.md for preparing data, resuming and profiling, docs/distributed.md for
# several GPUs (mpiexec inside the container: --entrypoint mpiexec ... -n 8 cllm-gpu train).
#
# Which CUDA pieces, and where they come from:
# - CuPy launches our kernels through cupy.RawModule, which compiles them at run time with
#   NVRTC, and CuPy 14 needs the CUDA headers (vector_types.h, cuda_fp16.h, ...) to compile ANY
#   kernel, its own elementwise ones included. It finds NVRTC, the headers and cuBLAS & co.
#   through cuda-pathfinder, which looks in the Python environment's site-packages first.
# - The package's `cuda12` extra is `cupy-cuda12x[ctk]`: the [ctk] extra installs NVRTC, the
#   headers (nvidia-cuda-runtime-cu12), cuBLAS, cuRAND, cuFFT, cuSPARSE and cuSOLVER as NVIDIA
#   wheels. So the smallest nvidia/cuda flavour, `base` (cudart and the forward-compatibility
#   libraries, nothing else), is enough: the `runtime` flavour would carry a second copy of those
#   libraries as .deb packages, but no headers (CuPy could not compile a kernel with it alone),
#   and `devel` (nvcc, static libraries, gigabytes more) adds nothing we use.
# - The CUDA wheels are pinned to the base image's CUDA release (cuda-toolkit==12.6.3), so the
#   driver requirement the base image declares is the real one. NVRTC 12.6 emits cubins up to
#   sm_90 (A100, H100, H200); for Blackwell (sm_100, sm_120) build on 12.8 or later, e.g.
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg CUDA_TOOLKIT_VERSION=12.8.1 --build-arg NVJITLINK_VERSION=12.8.93
# The image also builds on a plain Debian/Ubuntu base (no CUDA there): the package then runs
# its NumPy path, which is how scripts/docker_build_test.sh checks this file without a GPU.

ARG BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Pinned versions of everything pip installs, dependencies of dependencies included (the
# package's own extras give lower bounds only).
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
ARG NUMPY_VERSION=2.4.6
ARG THREADPOOLCTL_VERSION=3.8.0
ARG CUPY_VERSION=14.2.0
ARG CUDA_TOOLKIT_VERSION=12.6.3
ARG NVJITLINK_VERSION=12.6.85
ARG CUDA_PATHFINDER_VERSION=1.9.1
ARG NVTX_VERSION=0.2.17
# data parallelism: NCCL for the GPUs, mpi4py + MPICH (its mpiexec launches the ranks)
ARG NCCL_VERSION=2.32.3
ARG MPI4PY_VERSION=4.1.2
ARG MPICH_VERSION=5.0.2
# GPU architectures every kernel is compiled for at build time (80: A100, 90: H100/H200).
ARG KERNEL_CHECK_ARCHS="sm_80 sm_90"
ARG APP_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python from the base distribution (Ubuntu 24.04: 3.12, Debian 12: 3.11).
# The apt packages are not pinned to exact versions: BASE_IMAGE is pinned to a release tag and
# the distribution's security updates should apply; a pin would also tie the file to one
# distribution (the build test uses a Debian base).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/cllm-gpu \
    PATH=/opt/cllm-gpu/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/var/cache/cllm-gpu/cupy

# The heavy, rarely changing layer: the pinned runtime dependencies (cuda-toolkit pins each
# CUDA library wheel to its release; nvJitLink, which it leaves open, is pinned here). It does
# not depend on the source tree, so editing the package does not re-download CuPy and CUDA.
RUN python3 -m venv "${VIRTUAL_ENV}" \
 && pip install --no-cache-dir "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
 && pip install --no-cache-dir \
        "numpy==${NUMPY_VERSION}" \
        "threadpoolctl==${THREADPOOLCTL_VERSION}" \
        "cupy-cuda12x[ctk]==${CUPY_VERSION}" \
        "cuda-toolkit[cublas,cudart,cufft,curand,cusolver,cusparse,nvrtc]==${CUDA_TOOLKIT_VERSION}" \
        "nvidia-nvjitlink-cu12==${NVJITLINK_VERSION}" \
        "cuda-pathfinder==${CUDA_PATHFINDER_VERSION}" \
        "nvtx==${NVTX_VERSION}" \
        "nvidia-nccl-cu12==${NCCL_VERSION}" \
        "mpi4py==${MPI4PY_VERSION}" \
        "mpich==${MPICH_VERSION}"

# The package itself, from this source tree (see .dockerignore), with the cuda12, profile and
# dist extras; they are already satisfied by the pinned layer above, so nothing is upgraded.
# `pip check` fails the build if the pins no longer satisfy the package's requirements.
COPY . /tmp/cllm-gpu-src
RUN pip install --no-cache-dir --no-build-isolation "/tmp/cllm-gpu-src[cuda12,profile,dist]" \
 && pip check \
 && rm -rf /tmp/cllm-gpu-src

RUN groupadd --gid "${APP_UID}" cllm \
 && useradd --create-home --uid "${APP_UID}" --gid "${APP_UID}" --shell /bin/bash cllm \
 && mkdir -p /data /checkpoints "${CUPY_CACHE_DIR}" \
 && chown cllm:cllm /data /checkpoints "${CUPY_CACHE_DIR}" \
 && chmod 1777 "${CUPY_CACHE_DIR}"

# Numeric, so that Kubernetes runAsNonRoot and hosts without this passwd entry understand it.
# `docker run --user UID:GID` works too: the kernel cache directory is writable by any user.
USER ${APP_UID}:${APP_UID}
WORKDIR /home/cllm

# Compile every kernel in kernels_cu/ with NVRTC for KERNEL_CHECK_ARCHS: no GPU needed, and a
# kernel that does not compile fails the build, not the first training run. (CuPy's on-disk
# cache cannot be filled without a GPU: its key includes the device's architecture, read from
# the device. On the GPU, CuPy compiles each kernel file once, in seconds, into CUPY_CACHE_DIR;
# mount a volume there to keep the cache across containers.)
RUN python -c 'import os, sys; from cllm_gpu.kernels import main; \
archs = os.environ["KERNEL_CHECK_ARCHS"].split(); \
sys.exit(main(["--precompile", "--nvrtc"] + [o for a in archs for o in ("--arch", a)]))'

# /data: token data directories (train.bin, val.bin, meta.json) - mount read-only if you like.
# /checkpoints: checkpoint directories written by `cllm-gpu train --out` and read by `--resume`.
VOLUME ["/data", "/checkpoints"]

ENTRYPOINT ["cllm-gpu"]
CMD ["--help"]
