#!/usr/bin/env bash
# Device run H2: every kernel checked against host references (fresh kernel cache), then the
# Llama-2-7B shape benchmarks of issue 5 with all kernels on. Leaves SmolLM2 for H3.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cp .gpu/smol.part00 /tmp/ 2>/dev/null
rm -rf $EASYKV_HOME/kernels
timeout 150 /tmp/easykv check-kernels --device cuda --models smollm2 2>&1 | cut -c1-300 | tee $OUT/check.txt | tail -40
export DEV=cuda EASYKV_GPU_KERNELS=all
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=120 bench7b dec
BENCH_TIMEOUT=90 bench7b full
BENCH_TIMEOUT=90 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=90 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
