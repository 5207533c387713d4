#!/usr/bin/env bash
# Device run H3: the kernels checked against host references with the default settings, the
# issue-5 table (Llama-2-7B shape, f16) with generous first-run limits (a fresh kernel cache
# compiles and autotunes for a minute or more), a cubecl profile of an evicting prefill, and
# the kernel cache saved for H4 (SmolLM2, next call on the same machine).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 150 /tmp/easykv check-kernels --device cuda --models smollm2 2>&1 | cut -c1-300 | tee $OUT/check.txt | tail -40
export DEV=cuda
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=150 bench7b dec
BENCH_TIMEOUT=90 bench7b full
BENCH_TIMEOUT=150 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=90 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=90 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
CUBECL_DEBUG_LOG=/tmp/prof.log NEW="--new-tokens 2" BENCH_TIMEOUT=90 bench7b prof --policy h2o --budget 0.5 --stride 64
sleep 2; xz -T4 -c /tmp/prof.log > $OUT/prof.log.xz
tar -C $EASYKV_HOME -cJf $OUT/kernels.tar.xz kernels; ls -la $OUT/kernels.tar.xz
