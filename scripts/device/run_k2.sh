#!/usr/bin/env bash
# Device run K2 (seventh session): the RMS norm inside the one-row product without the cube's
# wait (`GemvNorm::Inline`: each plane sums squares of the `x` it reads anyway) and RoPE angles
# made on the host. Every kernel checked, the GEMVs timed (inline against the staged norm), and
# the roco 0.25 row under three launch shapes of the GEMV (`EASYKV_GEMV`) and with the old staged norm.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
timeout 120 /tmp/easykv check-kernels --device cuda 2>&1 | cut -c1-300 | tee $OUT/check.txt | grep -vE "^\s+[0-9]"
timeout 100 /tmp/easykv check-kernels --device cuda --time --dtype f16 --slots 1088 2>&1 | grep -E "gemv|norm" | tee $OUT/time.txt
BENCH_TIMEOUT=150 bench7b roco25 --policy roco --budget 0.25 --stride 64
EASYKV_GEMV=2,1,2 BENCH_TIMEOUT=100 bench7b roco25_r2p1 --policy roco --budget 0.25 --stride 64
EASYKV_GEMV=4,1,2 BENCH_TIMEOUT=100 bench7b roco25_r4p1 --policy roco --budget 0.25 --stride 64
EASYKV_GEMV=8,0,1 BENCH_TIMEOUT=100 bench7b roco25_staged --policy roco --budget 0.25 --stride 64
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 24" BENCH_TIMEOUT=100 bench7b trace --policy roco --budget 0.25 --stride 64
grep "^chunk of 1 " /tmp/err.trace | tail -6 | tee $OUT/trace.txt
