#!/usr/bin/env bash
# Device run J2 (sixth session): `matmul_rows` with the rows of `x` staged in shared memory,
# the cache's new kernels (kept slots listed, keys and values compacted in one launch per
# layer) checked and timed; evicting prefills with products of a few rows by
# `matmul_rows` for every shape or only where it wins (EASYKV_ROWS' fifth field); decode with
# the RMS norm inside the GEMV or as a launch of its own (EASYKV_GEMV's third field).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
timeout 150 /tmp/easykv check-kernels --device cuda --dtype f16,bf16 --models smollm2 2>&1 | cut -c1-300 | tee $OUT/check.txt | grep -E "FAIL|fail|rows|gather|list|all|error"
timeout 150 /tmp/easykv check-kernels --device cuda --time --dtype f16 --slots 2112 2>&1 | grep -E "rows|burn matmul|normed|norm, then|launch cost" | tee $OUT/time.txt
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 2" BENCH_TIMEOUT=150 bench7b trace --policy roco --budget 0.5 --stride 64
grep "^chunk" /tmp/err.trace | sed -n 4,7p | tee $OUT/trace.txt
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
EASYKV_ROWS=2048,4,2,8 BENCH_TIMEOUT=100 bench7b roco25_8 --policy roco --budget 0.25 --stride 64
EASYKV_ROWS=2048,4,2,4,8192 BENCH_TIMEOUT=100 bench7b roco25_hybrid --policy roco --budget 0.25 --stride 64
for g in 8,0,1 8,0,0; do
  EASYKV_GEMV=$g PROMPT="--prompt-tokens 512" NEW="--new-tokens 128" CHUNK="--chunk-size 512" BENCH_TIMEOUT=100 bench7b "dec_$g"
done
