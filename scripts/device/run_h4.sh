#!/usr/bin/env bash
# Device run H4 (right after H3, same machine): SmolLM2 against the references on CUDA with
# the default kernels, f32 (chat and EasyKV summarize) and f16 (chat).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32"; timeout 200 $V cuda $R 2>&1 | tee $OUT/verify_f32.txt | tail -12
echo "== cuda f16 (tolerance 5e-2)"; timeout 80 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tee $OUT/verify_f16.txt | tail -9
