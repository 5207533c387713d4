#!/usr/bin/env bash
# Device run J1 (sixth session): the tensor-core product for a prefill stride's 64 rows
# (`matmul_rows`) checked against host references (and inside whole random-weight models),
# timed per launch shape against burn's matmul, then evicting prefills with it.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
timeout 150 /tmp/easykv check-kernels --device cuda --dtype f16,bf16 --models smollm2 -v 2>&1 | cut -c1-400 | grep -E -A4 "rows|FAIL|fail|smollm2|error" | head -40 | tee $OUT/check.txt
timeout 150 /tmp/easykv check-kernels --device cuda --time --dtype f16 --slots 2112 2>&1 | grep -E "rows|burn matmul|launch cost" | tee $OUT/time.txt
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 2" BENCH_TIMEOUT=150 bench7b trace --policy roco --budget 0.5 --stride 64
grep "^chunk" /tmp/err.trace | head -6 | tee $OUT/trace.txt
BENCH_TIMEOUT=100 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
EASYKV_ROWS=1024 BENCH_TIMEOUT=100 bench7b roco25_1024 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=100 bench7b full
