#!/usr/bin/env bash
# Device run H5 (diagnosis): where an evicting prefill's time goes. One h2o 0.5 prefill of the
# 7B shape compiles and autotunes, then a second runs under cubecl's profiler (every kernel
# timed, so slower); the summary counts launches and time per kernel.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
B="timeout 120 /tmp/easykv bench --device cuda --random-weights llama2-7b --dtype f16 --prompt-tokens 4096 --new-tokens 2 --chunk-size 4096 --repeat 1 --policy h2o --budget 0.5 --stride 64"
$B 2>&1 | grep -E "run 1|error"
CUBECL_DEBUG_LOG=/tmp/prof.log $B 2>&1 | grep -E "run 1|error"
sleep 2
grep -c CudaRuntime /tmp/prof.log
awk -F'|' '/CudaRuntime/{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t ~ /[0-9]s$/ && t !~ /µs$/) v*=1e6; name=$3; for(i=4;i<NF;i++) name=name"|"$i; gsub(/ /,"",name); n[name]++; s[name]+=v} END{for(k in n) printf "%8d %12.0f us  %s\n", n[k], s[k], k}' /tmp/prof.log | sort -k2 -rn | head -45
xz -T8 -c /tmp/prof.log > $OUT/prof.log.xz
