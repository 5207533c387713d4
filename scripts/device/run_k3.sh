#!/usr/bin/env bash
# Device run K3 (seventh session): the norm inside the one-row product from `x·γ` written by
# the product before (`GemvNorm::Inline`: `gemv_scaling` + `gemv_prescaled`), RoPE angles made
# on the host. Every kernel checked, the GEMVs timed, the roco 0.25 row under launch shapes of
# the GEMV (`EASYKV_GEMV`, the staged norm among them); the best of those runs the issue-5
# table. Carries `smol.part00` for K4.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 120 /tmp/easykv check-kernels --device cuda 2>&1 | cut -c1-300 | tee $OUT/check.txt | grep -vE "^\s+[0-9]"
timeout 100 /tmp/easykv check-kernels --device cuda --time --dtype f16 --slots 1088 2>&1 | grep -E "gemv|norm" | tee $OUT/time.txt
best=""; best_tps=0
for g in 8,0,2 2,1,2 4,1,2 8,0,1; do
  EASYKV_GEMV=$g BENCH_TIMEOUT=150 bench7b "roco25_$g" --policy roco --budget 0.25 --stride 64
  tps=$(python3 -c "import json; print(json.load(open('/tmp/out.roco25_$g'))['decode_tokens_per_second'])" 2>/dev/null || echo 0)
  if python3 -c "import sys; sys.exit(0 if $tps > $best_tps else 1)"; then best=$g; best_tps=$tps; fi
done
echo "== best EASYKV_GEMV=$best ($best_tps tok/s)" | tee $OUT/best.txt
export EASYKV_GEMV=$best
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 24" BENCH_TIMEOUT=100 bench7b trace --policy roco --budget 0.25 --stride 64
grep "^chunk of 1 " /tmp/err.trace | tail -4 | tee $OUT/trace.txt
BENCH_TIMEOUT=120 bench7b full
BENCH_TIMEOUT=100 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=100 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
