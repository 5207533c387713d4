#!/usr/bin/env bash
# Device run E2: HF baseline and easykv llama2-7b side by side; easykv on CUDA without fusion
# (every configuration) and with burn's fusion (full cache). Saves the kernel caches.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
mkdir -p $EASYKV_HOME && tar -C $EASYKV_HOME -xJf .gpu/kernels.tar.xz
cp .gpu/smol.part00 /tmp/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== HF llama2-7b"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem.hf &
smi=$!
timeout 170 python3 bench/hf_baseline.py 2>&1 | tee $OUT/hf.jsonl | tail -7
kill $smi; echo "HF process peak (nvidia-smi, all configs): $(sort -n /tmp/mem.hf | tail -1) MiB"
echo "== easykv llama2-7b"
export DEV=cuda-unfused
BENCH_TIMEOUT=100
bench7b full; BENCH_TIMEOUT=70
bench7b roco50 --policy roco --budget 0.5 --stride 64
bench7b h2o50 --policy h2o --budget 0.5 --stride 64
bench7b roco25 --policy roco --budget 0.25 --stride 64
bench7b h2o25 --policy h2o --budget 0.25 --stride 64
BENCH_TIMEOUT=85 DEV=cuda bench7b full_fused
tar -C $EASYKV_HOME -cJf $OUT/kernels.tar.xz kernels 2>/dev/null; ls -la $OUT/kernels.tar.xz
