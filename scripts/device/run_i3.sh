#!/usr/bin/env bash
# Device run I3 (fifth session): the new kernels (RMS norm inside the GEMV, keys and values
# written into the cache by the RoPE kernel, one-pass decode attention, ranking by sorting,
# attention statistics written in place) checked against host references and burn's
# operations; the table's budget-0.5 rows; where an evicting prefill's time goes
# (EASYKV_TRACE_CHUNKS: the device synchronized after each chunk's layers and its eviction).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 170 /tmp/easykv check-kernels --device cuda --models smollm2 2>&1 | cut -c1-300 | tee $OUT/check.txt | tail -48
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=150 bench7b dec
BENCH_TIMEOUT=100 bench7b full
BENCH_TIMEOUT=100 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 2" BENCH_TIMEOUT=100 bench7b trace --policy roco --budget 0.5 --stride 64
grep "^chunk" /tmp/err.trace | tail -34 | tee $OUT/trace.txt
