#!/usr/bin/env bash
# Device run F3 (right after F2, same machine): SmolLM2 against the references on CUDA with
# the kernels F2 found correct, f32 and f16; then the 0.25 budgets of the 7B table.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export EASYKV_GPU_KERNELS=$(cat /tmp/ok_kernels 2>/dev/null || echo off)
echo "kernels: $EASYKV_GPU_KERNELS"
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32"; timeout 240 $V cuda $R 2>&1 | tail -12
echo "== cuda f16 (tolerance 5e-2)"; timeout 100 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tail -9
export DEV=cuda
BENCH_TIMEOUT=70 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=70 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
