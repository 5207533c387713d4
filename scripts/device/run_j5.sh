#!/usr/bin/env bash
# Device run J5 (sixth session, last): where a decode step under eviction goes at a budget-0.25
# shape (1,024 slots): cubecl's per-kernel profile (every launch synchronized, so small kernels
# look larger than they are) of a RoCo run, 1,088-token prompt, budget 1,024 tokens, 64 new
# tokens (warm-up and run both profiled: 128 decode steps), next to a full-cache run of the
# same lengths. Run as committed first (without the unprofiled warm-up now at the top), the
# RoCo run spent its 170 s autotuning under the profiler and never reached decoding: warm the
# kernel cache unprofiled first.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
summary() {
  awk -F'|' '/CudaRuntime/{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t ~ /[0-9]s$/ && t !~ /µs$/) v*=1e6; name=$3; gsub(/ /,"",name); n[name]++; s[name]+=v} END{for(k in n) printf "%8d %12.0f us  %s\n", n[k], s[k], substr(k,1,60)}' $1 | sort -k2 -rn | head -40
}
PROMPT="--prompt-tokens 1088" NEW="--new-tokens 2" BENCH_TIMEOUT=150 bench7b warm --policy roco --budget 1024 --stride 64
CUBECL_DEBUG_LOG=/tmp/prof.log PROMPT="--prompt-tokens 1088" NEW="--new-tokens 64" BENCH_TIMEOUT=170 bench7b prof --policy roco --budget 1024 --stride 64
sleep 1; summary /tmp/prof.log | tee $OUT/prof-roco.txt
CUBECL_DEBUG_LOG=/tmp/prof-full.log PROMPT="--prompt-tokens 1088" NEW="--new-tokens 64" BENCH_TIMEOUT=100 bench7b proffull
sleep 1; summary /tmp/prof-full.log | tee $OUT/prof-full.txt
