#!/usr/bin/env bash
# Device run I4 (right after I3, same machine): the table's budget-0.25 rows, then SmolLM2
# against the references on CUDA: f32 and f16 chat, f32 EasyKV summarize.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=100 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32 chat"; timeout 100 $V cuda $R --checks chat 2>&1 | tee $OUT/verify_f32.txt | tail -8
echo "== cuda f32 summarize"; timeout 150 $V cuda $R --checks summarize 2>&1 | tee $OUT/verify_sum.txt | tail -6
echo "== cuda f16 chat (tolerance 5e-2)"; timeout 150 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tee $OUT/verify_f16.txt | tail -8
