#!/usr/bin/env bash
# Device run I2 (right after I1, same machine): SmolLM2 against the references on CUDA, f32
# with the exact-f32 matmul kernel (chat; then EasyKV summarize with a long limit) and f16 (chat).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32 chat"; timeout 120 $V cuda $R --checks chat 2>&1 | tee $OUT/verify_f32.txt | tail -8
echo "== cuda f16 chat (tolerance 5e-2)"; timeout 80 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tee $OUT/verify_f16.txt | tail -8
echo "== cuda f32 summarize"; CUBECL_AUTOTUNE_LEVEL=minimal timeout 240 $V cuda $R --checks summarize 2>&1 | tee $OUT/verify_sum.txt | tail -8
