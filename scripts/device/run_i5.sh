#!/usr/bin/env bash
# Device run I5 (fifth session, last): GEMV launch shapes timed alone and compared over whole
# 7B decodes (EASYKV_GEMV=rows,plane), the issue-5 table with the best, and cubecl's
# per-kernel profile of a RoCo 0.5 prefill.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
timeout 120 /tmp/easykv check-kernels --device cuda --time --dtype f16 2>&1 | grep -E "launch cost|gemv|decode attention|rank" | tee $OUT/time.txt
best=""; best_tps=0
for g in 8,1 4,1 8,0 4,0; do
  EASYKV_GEMV=$g PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=150 bench7b "dec_$g"
  tps=$(python3 -c "import json; print(json.load(open('/tmp/out.dec_$g'))['decode_tokens_per_second'])" 2>/dev/null || echo 0)
  if python3 -c "import sys; sys.exit(0 if $tps > $best_tps else 1)"; then best=$g; best_tps=$tps; fi
done
echo "best EASYKV_GEMV=$best ($best_tps tok/s)"; export EASYKV_GEMV=$best
BENCH_TIMEOUT=90 bench7b full
BENCH_TIMEOUT=90 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=90 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
CUBECL_DEBUG_LOG=/tmp/prof.log NEW="--new-tokens 2" BENCH_TIMEOUT=90 bench7b prof --policy roco --budget 0.5 --stride 64
sleep 2
awk -F'|' '/CudaRuntime/{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t ~ /[0-9]s$/ && t !~ /µs$/) v*=1e6; name=$3; for(i=4;i<NF;i++) name=name"|"$i; gsub(/ /,"",name); n[name]++; s[name]+=v} END{for(k in n) printf "%8d %12.0f us  %s\n", n[k], s[k], substr(k,1,90)}' /tmp/prof.log | sort -k2 -rn | head -30 | tee $OUT/prof-summary.txt
