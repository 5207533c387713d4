#!/usr/bin/env bash
# Device run J3 (sixth session): every kernel checked (the few-row tensor-core product, the
# cache's slot listing and compaction among them), the few-row products timed, the issue-5
# table with this build (products of 64 rows by `matmul_rows` up to 8,192 output columns,
# burn's beyond), and where an evicting prefill's time goes now. Carries `smol.part00`
# for J4.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 150 /tmp/easykv check-kernels --device cuda --models smollm2 2>&1 | cut -c1-300 | tee $OUT/check.txt | grep -vE "^\s+[0-9]"
timeout 100 /tmp/easykv check-kernels --device cuda --time --dtype f16 --slots 2112 2>&1 | grep -E "rows|burn matmul" | tee $OUT/time.txt
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 2" BENCH_TIMEOUT=200 bench7b trace --policy roco --budget 0.5 --stride 64
grep "^chunk" /tmp/err.trace | sed -n 4,8p | tee $OUT/trace.txt
BENCH_TIMEOUT=120 bench7b full
BENCH_TIMEOUT=100 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=100 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
