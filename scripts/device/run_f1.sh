#!/usr/bin/env bash
# Device run F1: the fused CUDA kernels (easykv-models/src/gpu_kernels) checked one by one
# against burn's operations, then Llama-2-7B-shape decode and evicting prefill with them on
# and off (EASYKV_GPU_KERNELS).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
mkdir -p $EASYKV_HOME && [ -f .gpu/kernels.tar.xz ] && tar -C $EASYKV_HOME -xJf .gpu/kernels.tar.xz
cp .gpu/smol.part00 /tmp/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# One process per kernel: a kernel that fails to compile does not hide the others.
for k in rms_norm swiglu softmax split_rope gemv attention; do
  EASYKV_GPU_KERNELS=$k timeout 90 /tmp/easykv check-kernels --device cuda 2>&1 | grep -E "$k|error" | head -4
done
export DEV=cuda
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=90 bench7b dec_on
export EASYKV_GPU_KERNELS=off
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=90 bench7b dec_off
unset EASYKV_GPU_KERNELS
BENCH_TIMEOUT=100 bench7b full
BENCH_TIMEOUT=80 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=80 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
tar -C $EASYKV_HOME -cJf $OUT/kernels.tar.xz kernels 2>/dev/null; ls -la $OUT/kernels.tar.xz
