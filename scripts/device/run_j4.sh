#!/usr/bin/env bash
# Device run J4 (right after J3, same machine): SmolLM2 against the references on CUDA (f32
# chat and EasyKV summarize with roco and h2o, which now list kept slots and compact keys and
# values by this session's kernels; f16 chat, whose short prompts now run their products on
# `matmul_rows`), then the table's decode repeated.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda f32 chat"; timeout 100 $V cuda $R --checks chat 2>&1 | tee $OUT/verify_f32.txt | tail -8
echo "== cuda f32 summarize"; timeout 150 $V cuda $R --checks summarize 2>&1 | tee $OUT/verify_sum.txt | tail -6
echo "== cuda f16 chat (tolerance 5e-2)"; timeout 120 $V cuda $R --dtype f16 --tolerance 5e-2 --checks chat 2>&1 | tee $OUT/verify_f16.txt | tail -8
