#!/usr/bin/env bash
# Build the fcmae image and run the README's Docker commands in it (docker/README.md, "Checking an image").
#
#   docker/verify.sh [--cuda] [--engine podman|docker] [--build-arg NAME=VALUE ...]
#
# 1. A base image debian:bookworm-slim, unless the engine has one: debootstrap --variant=minbase bookworm from
#    this machine's apt mirror, imported into the engine (no registry needed; needs root and debootstrap).
# 2. The CPU image fcmae:cpu from docker/Dockerfile. With podman, pip inside the build gets this machine's pip
#    configuration, CA bundle and local wheel folders (`pip config list`), mounted read-only for the build only,
#    so torch comes from local disk where it lies there; nothing of it stays in the image.
# 3. In the image, as its non-root user: --help of both scripts, a 5-step demo pretraining on 2 processes under
#    accelerate launch (its loss must fall), fcmae-convert to timm, and a 1-epoch fine-tune on the digits
#    (top-1 above twice chance, and the file loads into timm strictly).
# 4. With --cuda, the CUDA image fcmae:cuda (PyPI's torch wheels, about 3 GB) and a torch check in it.
#
# Images stay (they are the cache of the next run); the output volume is removed. Exit status 0 means all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

cuda=0 engine="" build_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) cuda=1 ;;
        --engine) engine="$2"; shift ;;
        --build-arg) build_args+=(--build-arg "$2"); shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$engine" ]; then
    if command -v podman >/dev/null; then engine=podman
    elif command -v docker >/dev/null; then engine=docker
    else echo "error: neither podman nor docker is installed" >&2; exit 2; fi
fi

start=$SECONDS
tmp=$(mktemp -d)
volume=fcmae-verify-output-$$
cleanup() {
    rm -rf "$tmp"
    "$engine" volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT
say() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - start)); }
fail() { echo "verify: FAILED: $*" >&2; exit 1; }

# This machine's settings for podman: runc (crun fails on hybrid cgroups), limits root may not raise, and the
# host network, which reaches the package registries.
engine_cmd=("$engine") run_flags=() build_flags=()
if [ "$engine" = podman ]; then
    command -v runc >/dev/null && engine_cmd+=(--runtime runc)
    run_flags=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network host)
    # docker format: the OCI format drops SHELL
    build_flags=("${run_flags[@]}" --format docker --ignorefile docker/Dockerfile.dockerignore)
fi
engine() { echo "+ $engine $*" >&2; "${engine_cmd[@]}" "$@"; }

# --- 1. the base image ------------------------------------------------------------------------------------
if "${engine_cmd[@]}" image exists debian:bookworm-slim 2>/dev/null \
        || { [ "$engine" = docker ] && docker image inspect debian:bookworm-slim >/dev/null 2>&1; }; then
    say "base: debian:bookworm-slim is there"
else
    command -v debootstrap >/dev/null || fail "no debian:bookworm-slim image and no debootstrap to make one"
    # The Debian mirror apt is configured with (Debian's deb822 file, or the one-line format).
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
        | grep -v security | head -n1 || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "base: debootstrap --variant=minbase bookworm from $mirror"
    nice debootstrap --variant=minbase bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -n 20 "$tmp/debootstrap.log"; fail "debootstrap"; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$tmp/rootfs/etc/apt/sources.list"
    rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*
    tar -C "$tmp/rootfs" -c . | engine import - debian:bookworm-slim >/dev/null
    rm -rf "$tmp/rootfs"
fi

# --- pip settings of this machine, for podman builds ------------------------------------------------------
# `pip config list` prints key='value' (config files and PIP_* variables); they become one pip.conf, mounted at
# /etc/pip.conf. Every local path in them (CA bundle, constraint files, find-links and file:// index folders) is
# mounted read-only under /tmp/host, and the build's /tmp is a host folder: so the image keeps nothing of them
# but an empty /etc/pip.conf (the mount point), and pip's temporary files stay out of the layers too.
if [ "$engine" = podman ] && command -v pip >/dev/null; then
    mkdir -m 1777 "$tmp/build-tmp"  # as /tmp is: apt's own user writes there
    build_flags+=(-v "$tmp/build-tmp:/tmp" -v "$tmp/pip.conf:/etc/pip.conf:ro")
    pip config list 2>/dev/null | python3 -c '
import os, re, sys
values, mounts = {}, set()
for line in sys.stdin:
    m = re.match(r"^(?::env:|[\w-]+)\.([\w-]+)=(.*)$", line.strip())
    if m:
        values[m.group(1)] = m.group(2).strip("\x27\"")

def in_build(token):
    path = token[len("file://"):] if token.startswith("file://") else token
    if not (os.path.isabs(path) and os.path.exists(path)):
        return token
    path = path.rstrip("/")
    # a PEP 503 tree links ../../files from simple/NAME/, so its root is mounted
    mounts.add(os.path.dirname(path) if path.endswith("/simple") else path)
    return token.replace(path, "/tmp/host" + path, 1)

with open(sys.argv[1], "w") as f:
    f.write("[global]\n")
    for key, value in values.items():
        tokens = [in_build(token) for token in value.split()]
        f.write(key + " = " + " ".join(tokens) + "\n")
print("\n".join(sorted(mounts)))
' "$tmp/pip.conf" >"$tmp/mounts"
    while read -r path; do
        [ -n "$path" ] && build_flags+=(-v "$path:/tmp/host$path:ro")
    done <"$tmp/mounts"
fi

# --- 2. the CPU image -------------------------------------------------------------------------------------
# PyTorch's CPU wheels where their index answers. Otherwise PyPI's wheels, which run on CPU as well but bring the
# CUDA libraries (about 3 GB; local where the pip configuration points to local folders, as on the CI machines).
cpu_args=() note="torch from PyTorch's CPU index"
if ! python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=15)" \
        2>/dev/null; then
    cpu_args=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
    note="PyTorch's CPU index is unreachable: PyPI's torch wheels, with CUDA libraries, run on CPU too"
fi
say "build fcmae:cpu ($note)"
engine build "${build_flags[@]}" "${cpu_args[@]}" "${build_args[@]}" -f docker/Dockerfile -t fcmae:cpu . \
    || fail "building fcmae:cpu"

# --- 3. the README's commands in the image ----------------------------------------------------------------
in_image() { engine run --rm "${run_flags[@]}" -v "$volume:/workspace/output" fcmae:cpu "$@"; }

say "run: --help of both scripts"
in_image python pretrain.py --help | grep -- --mask-ratio >/dev/null || fail "pretrain.py --help"
in_image python finetune.py --help | grep -- --layer-decay >/dev/null || fail "finetune.py --help"

say "run: 5-step demo pretraining, 2 processes under accelerate launch"
in_image accelerate launch --multi_gpu --num_processes 2 pretrain.py --config configs/demo.yaml --max-steps 5 --warmup-steps 1 --log-every 1 \
    || fail "demo pretraining"
say "run: conversion to timm"
in_image fcmae-convert output/demo/fcmae_model.safetensors output/demo/atto_timm.safetensors --to timm \
    || fail "fcmae-convert"
say "run: 1-epoch fine-tune on the digits"
in_image python finetune.py --config configs/finetune/demo.yaml --epochs 1 --finetune output/demo/atto_timm.safetensors || fail "fine-tuning"

say "check the outputs"
check=$(cat <<'EOF'
import json, os
import safetensors.torch, timm

assert os.getuid() != 0, "the image runs as root"
losses = [json.loads(line)["loss"] for line in open("output/demo/metrics.jsonl")]
assert len(losses) == 5 and losses[-1] < losses[0], f"pretraining loss did not fall: {losses}"
record = [json.loads(line) for line in open("output/finetune-demo/metrics.jsonl")][-1]
assert record["val_acc1"] > 20.0, f"fine-tune top-1 not above twice chance (10%): {record}"
model = timm.create_model("convnextv2_atto", num_classes=10)
model.load_state_dict(safetensors.torch.load_file("output/finetune-demo/classifier.safetensors"))  # strict
owners = {os.stat(os.path.join(d, f)).st_uid for d, _, fs in os.walk("output") for f in fs}
assert owners == {os.getuid()}, f"outputs owned by {owners}"
print(f"pretraining loss {losses[0]:.4f} -> {losses[-1]:.4f}; fine-tune top-1 {record['val_acc1']:.2f}% "
      f"after 1 epoch; timm loads the model strictly; outputs owned by uid {os.getuid()}")
EOF
)
in_image python -c "$check" || fail "the outputs"

# --- 4. the CUDA image ------------------------------------------------------------------------------------
if [ "$cuda" = 1 ]; then
    say "build fcmae:cuda"
    engine build "${build_flags[@]}" --build-arg TORCH_INDEX_URL=https://pypi.org/simple "${build_args[@]}" \
        -f docker/Dockerfile -t fcmae:cuda . || fail "building fcmae:cuda"
    say "run: torch in fcmae:cuda"
    engine run --rm "${run_flags[@]}" fcmae:cuda python -c "
import torch, torchvision, fcmae
assert torch.version.cuda, 'torch in fcmae:cuda is a CPU build'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(),
      'torchvision', torchvision.__version__, 'GPU visible:', torch.cuda.is_available())
loss, pred, mask = fcmae.create_model('atto', img_size=64)(torch.randn(2, 3, 64, 64))
print('FCMAE forward on CPU: loss', round(loss.item(), 4))
" || fail "torch in fcmae:cuda"
fi

say "verify: OK"
