#!/usr/bin/env bash
# Device run G1: the fused kernels (fresh kernel cache) checked against burn's operations, then
# the 7B decode and evicting prefill with all of them. Leaves the SmolLM2 half for G2.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 90 /tmp/easykv check-kernels --device cuda --models '' 2>&1 | cut -c1-300 | tee $OUT/check.txt | tail -30
export DEV=cuda
# A fresh kernel cache compiles and autotunes for a minute or more in the first process.
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=150 bench7b dec
BENCH_TIMEOUT=90 bench7b full
BENCH_TIMEOUT=90 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=60 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
