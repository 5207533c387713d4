#!/usr/bin/env bash
# Device run I1 (fifth session): what each decode kernel costs on the H200 and how close it
# comes to the bandwidth (gemv launch shapes and split attention compared), the kernels checked
# against host references, two rows of the table with this build, and cubecl's profile of an
# evicting prefill (h2o 0.5) summed per kernel.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 150 /tmp/easykv check-kernels --device cuda --time --dtype f16 2>&1 | tee $OUT/time.txt
timeout 150 /tmp/easykv check-kernels --device cuda --models '' 2>&1 | cut -c1-300 | tee $OUT/check.txt | tail -30
BENCH_TIMEOUT=150 bench7b full
BENCH_TIMEOUT=150 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
EASYKV_TRACE_CHUNKS=1 NEW="--new-tokens 2" BENCH_TIMEOUT=120 bench7b trace --policy h2o --budget 0.5 --stride 64
grep "^chunk" /tmp/err.trace | tail -36 | tee $OUT/trace.txt
CUBECL_DEBUG_LOG=/tmp/prof.log NEW="--new-tokens 2" BENCH_TIMEOUT=120 bench7b prof --policy h2o --budget 0.5 --stride 64
sleep 2
# Per kernel: launches and summed time (the profiler synchronizes every launch, so small
# kernels read long); the second warm run's share is what matters, so both runs are summed.
awk -F'|' '/CudaRuntime/{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t ~ /[0-9]s$/ && t !~ /µs$/) v*=1e6; name=$3; for(i=4;i<NF;i++) name=name"|"$i; gsub(/ /,"",name); n[name]++; s[name]+=v} END{for(k in n) printf "%8d %12.0f us  %s\n", n[k], s[k], k}' /tmp/prof.log | sort -k2 -rn | head -40 | tee $OUT/prof-summary.txt
