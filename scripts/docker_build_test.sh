#!/usr/bin/env bash
# Build the Dockerfile and smoke-test the image on a machine with no Docker engine and no
# container registry (CI's machine, for one): Debian's podman builds it, on a Debian bookworm
# base image made locally with debootstrap from the apt mirror.
#
#   sudo scripts/docker_build_test.sh            # as root: podman here runs rootful
#
# What it does:
#   1. installs podman, runc and debootstrap with apt-get if they are missing;
#   2. debootstraps a minimal bookworm root filesystem once, cached under $CLLM_BASE_DIR
#      (default /var/tmp/cllm-base), and imports it as $CLLM_BASE_IMAGE;
#   3. builds the Dockerfile with BASE_IMAGE=$CLLM_BASE_IMAGE (no CUDA in that base: the package
#      runs its NumPy path; the cuda12 extra still installs and the kernels still compile with
#      NVRTC from the wheel);
#   4. runs the image with no network: `cllm-gpu --help`, `cllm-gpu prepare` on a small text,
#      a short `cllm-gpu train` into a mounted /checkpoints, then a resume from it.
#
# Environment knobs: CLLM_BASE_DIR, CLLM_BASE_IMAGE, CLLM_IMAGE, DEBIAN_MIRROR,
# CLLM_REMOVE_IMAGE=1 (remove the built image at the end; by default it stays, tagged, so the
# next run reuses its layers and only rebuilds from the source COPY on), CLLM_NO_APT=1 (never
# apt-get install).
#
# Why the podman flags (found by trying on this kind of machine, a VM with hybrid cgroups v1+v2
# and without CAP_SYS_RESOURCE):
#   build: --isolation chroot   RUN steps run in a chroot, not through an OCI runtime;
#          --format docker      the OCI image format has no SHELL instruction;
#          --network host       build steps reach PyPI and the apt mirror like the host does.
#   run:   --runtime runc       crun refuses hybrid cgroups ("cgroups in hybrid mode not
#                               supported, drop all controllers from cgroupv2");
#          --ulimit nofile=.. --ulimit nproc=..   podman's default rlimits are above this
#                               machine's hard limits and raising them is not permitted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_DIR=${CLLM_BASE_DIR:-/var/tmp/cllm-base}
BASE_IMAGE=${CLLM_BASE_IMAGE:-localhost/cllm-base:bookworm}
IMAGE=${CLLM_IMAGE:-localhost/cllm-gpu:build-test}
SUITE=bookworm

log() { printf '\n== %s\n' "$*" >&2; }
t0=$SECONDS

if [[ $(id -u) -ne 0 ]]; then
    echo "docker_build_test.sh: run as root (rootful podman, debootstrap)" >&2
    exit 2
fi

# --- 1. tools -----------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ -n ${CLLM_NO_APT:-} ]] || ! command -v apt-get >/dev/null; then
        echo "docker_build_test.sh: missing ${missing[*]}" >&2
        exit 2
    fi
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman runc debootstrap uidmap ca-certificates
fi

# --- 2. base image ------------------------------------------------------------------------
mirror() {
    # The mirror apt already uses (deb822 sources or the classic list), else Debian's default.
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local m
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [[ -z $m ]] && m=$(awk '$1 == "deb" && $3 == "'$SUITE'" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

rootfs=$BASE_DIR/rootfs
if [[ ! -f $BASE_DIR/rootfs.done ]]; then
    log "debootstrap $SUITE from $(mirror) into $rootfs (once)"
    rm -rf "$rootfs"
    mkdir -p "$BASE_DIR"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$(mirror)" >"$BASE_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$BASE_DIR/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$BASE_DIR/rootfs.done"
fi

# Make the base trust what this host trusts: where outgoing TLS goes through an inspecting
# proxy, its CA sits in /usr/local/share/ca-certificates; the Dockerfile's ca-certificates
# install then folds it into the system bundle, and pip is pointed at that bundle (pip uses
# its own certifi bundle otherwise). On a host without local CAs this adds nothing.
mkdir -p "$rootfs/usr/local/share/ca-certificates"
find "$rootfs/usr/local/share/ca-certificates" -name '*.crt' -delete
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
if ((${#local_cas[@]})); then
    cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
else
    rm -f "$rootfs/etc/pip.conf"
fi

# Re-import only when the base changed, so podman's layer cache survives between runs.
stamp=$( (stat -c %Y "$BASE_DIR/rootfs.done"
          cat "$rootfs/usr/local/share/ca-certificates/"*.crt "$rootfs/etc/pip.conf" 2>/dev/null || true
         ) | sha256sum | cut -c1-16)
if ! podman image exists "$BASE_IMAGE" || [[ $(cat "$BASE_DIR/image.stamp" 2>/dev/null) != "$stamp" ]]; then
    log "importing $rootfs as $BASE_IMAGE"
    tar -C "$rootfs" --numeric-owner -c . | podman import - "$BASE_IMAGE" >/dev/null
    echo "$stamp" >"$BASE_DIR/image.stamp"
fi

# --- 3. build -----------------------------------------------------------------------------
log "podman build -t $IMAGE (BASE_IMAGE=$BASE_IMAGE)"
tb=$SECONDS
podman build --format docker --isolation chroot --network host \
    --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$ROOT"
echo "build: $((SECONDS - tb)) s" >&2

# --- 4. run -------------------------------------------------------------------------------
work=$(mktemp -d /var/tmp/cllm-docker-test.XXXXXX)
cleanup() {
    rm -rf "$work"
    if [[ -n ${CLLM_REMOVE_IMAGE:-} ]]; then podman rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
    # layers of earlier builds that no tag uses any more
    podman image prune -f >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$work/data" "$work/ckpt" "$work/text"
uid=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
chown -R "${uid%%:*}" "$work/data" "$work/ckpt"

# A small corpus for `prepare`: a few hundred kB of varied plain text.
python3 - "$work/text/corpus.txt" <<'EOF'
import random, sys
rng = random.Random(0)
words = ("the model trains on tokens and the loss falls as the steps go by while "
         "gradients flow backward through every layer of the transformer").split()
with open(sys.argv[1], "w") as f:
    for _ in range(4000):
        f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + ".\n")
EOF

in_container() {
    # --network none: the image must run with no network at all.
    podman --runtime runc run --rm --network none \
        --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
        -v "$work/data:/data" -v "$work/ckpt:/checkpoints" -v "$work/text:/text:ro" \
        "$IMAGE" "$@"
}

log "cllm-gpu --help"
in_container --help

log "cllm-gpu prepare"
in_container prepare /text/corpus.txt --out /data/corpus --tokenizer byte

log "cllm-gpu train (short; NumPy path: no GPU in this container)"
small=(--batch-size 2 --block-size 32 --n-layer 1 --n-head 2 --n-embd 32
       --eval-interval 2 --eval-batches 1 --log-interval 1 --sample-tokens 16)
in_container train --data /data/corpus --out /checkpoints/run1 --max-steps 4 "${small[@]}"
ckpt=$(find "$work/ckpt/run1" -name model.safetensors -printf '%h\n' | sort | tail -1)
for f in model.safetensors optimizer.safetensors state.json; do
    [[ -s $ckpt/$f ]] || { echo "no $f in a checkpoint under run1" >&2; find "$work/ckpt" >&2; exit 1; }
done

log "cllm-gpu train --resume"
in_container train --resume /checkpoints/run1 --out /checkpoints/run1 --data /data/corpus \
    --max-steps 6 "${small[@]}"
step=$(python3 -c 'import json, sys; print(max(json.load(open(p))["step"] for p in sys.argv[1:]))' \
       "$work"/ckpt/run1/*/state.json)
[[ $step == 6 ]] || { echo "after the resume the newest checkpoint is at step $step, not 6" >&2; exit 1; }

log "OK: image builds and trains ($((SECONDS - t0)) s in all)"
