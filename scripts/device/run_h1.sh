#!/usr/bin/env bash
# Device run H1 (diagnosis): the CUDA source cubecl generates for the kernels (why softmax and
# attention_scores differ on CUDA only), and cubecl's per-kernel profile of a short 7B decode.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
rm -rf /tmp/ekh-diag; export EASYKV_HOME=/tmp/ekh-diag
CUBECL_DEBUG_LOG=/tmp/cubecl-check.log timeout 120 /tmp/easykv check-kernels --device cuda --models '' --dtype f32 2>&1 | cut -c1-300 | tail -30
sleep 2
xz -c /tmp/cubecl-check.log > $OUT/cubecl-check.log.xz; ls -la /tmp/cubecl-check.log
B="timeout 150 /tmp/easykv bench --device cuda --random-weights llama2-7b --dtype f16 --prompt-tokens 512 --new-tokens 32 --chunk-size 512 --repeat 1 --json"
$B > $OUT/plain.json 2> $OUT/plain.err; tail -3 $OUT/plain.err
CUBECL_DEBUG_LOG=/tmp/cubecl-prof.log $B > $OUT/prof.json 2> $OUT/prof.err; tail -3 $OUT/prof.err
sleep 2; ls -la /tmp/cubecl-prof.log; xz -c /tmp/cubecl-prof.log > $OUT/cubecl-prof.log.xz
grep -v '^\s*$' /tmp/cubecl-prof.log | tail -60
