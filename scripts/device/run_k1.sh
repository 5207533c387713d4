#!/usr/bin/env bash
# Device run K1 (seventh session): where a decode step under eviction at budget 0.25 goes.
# The table's roco 0.25 row (also warms the kernel cache), the same with every step traced
# (layers and cache step timed apart, the device synchronized around each), a full cache at
# about the same slot count (1,024-token prompt: decoding without observation or eviction),
# then cubecl's per-kernel profile of a RoCo decode at 1,024 slots after an unprofiled warm-up.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
summary() {
  awk -F'|' '/CudaRuntime/{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t ~ /[0-9]s$/ && t !~ /µs$/) v*=1e6; name=$3; gsub(/ /,"",name); n[name]++; s[name]+=v} END{for(k in n) printf "%8d %12.0f us  %s\n", n[k], s[k], substr(k,1,60)}' $1 | sort -k2 -rn | head -40
}
BENCH_TIMEOUT=150 bench7b roco25 --policy roco --budget 0.25 --stride 64
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 40" BENCH_TIMEOUT=100 bench7b trace --policy roco --budget 0.25 --stride 64
grep "^chunk of 1 " /tmp/err.trace | tail -24 | tee $OUT/trace.txt
EASYKV_TRACE_CHUNKS=1 PROMPT="--prompt-tokens 1024" NEW="--new-tokens 40" BENCH_TIMEOUT=100 bench7b tracefull
grep "^chunk of 1 " /tmp/err.tracefull | tail -8 | tee $OUT/tracefull.txt
PROMPT="--prompt-tokens 1024" BENCH_TIMEOUT=100 bench7b full1024
PROMPT="--prompt-tokens 1088" NEW="--new-tokens 2" BENCH_TIMEOUT=100 bench7b warm --policy roco --budget 1024 --stride 64
CUBECL_DEBUG_LOG=/tmp/prof.log PROMPT="--prompt-tokens 1088" NEW="--new-tokens 64" BENCH_TIMEOUT=150 bench7b prof --policy roco --budget 1024 --stride 64
sleep 1; summary /tmp/prof.log | tee $OUT/prof-roco.txt
