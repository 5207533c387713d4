#!/usr/bin/env bash
# Device run F2 (right after F1, same machine): SmolLM2 against the references on CUDA with
# the fused kernels, f32 and f16; the remaining budgets of the 7B table.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32"; timeout 200 $V cuda $R 2>&1 | tail -12
echo "== cuda f16 (tolerance 5e-2)"; timeout 150 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tail -9
export DEV=cuda
BENCH_TIMEOUT=80 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=80 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
