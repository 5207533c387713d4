#!/usr/bin/env bash
# Device run E1: where GPU time goes. Decode and evicting prefill timed with burn's fusion and
# without it, then profiled (cubecl's per-kernel device time); then a wgpu smoke test.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
mkdir -p $EASYKV_HOME && tar -C $EASYKV_HOME -xJf .gpu/kernels.tar.xz
cp .gpu/smol.part00 /tmp/ 2>/dev/null
B=/tmp/easykv
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
show() { python3 -c "import json,sys; d=json.load(open('$1')); print('$1', json.dumps({k:d.get(k) for k in ['policy','budget','prefill_tokens_per_second','decode_tokens_per_second','load_seconds']}))" 2>/dev/null || tail -3 /tmp/err; }
run7b() { # tag device timeout args...
  local tag=$1 dev=$2 t=$3; shift 3
  local t0=$(date +%s%N)
  timeout $t $B bench --device $dev --random-weights llama2-7b --dtype f16 --repeat 1 --json "$@" > /tmp/$tag.json 2>/tmp/err
  echo "== $tag rc=$? wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"; show /tmp/$tag.json; cp /tmp/$tag.json $OUT/ 2>/dev/null
}
run7b dec_fused cuda 60 --prompt-tokens 512 --new-tokens 64
run7b dec_unfused cuda-unfused 120 --prompt-tokens 512 --new-tokens 64
run7b roco_fused cuda 60 --prompt-tokens 4096 --new-tokens 8 --chunk-size 4096 --policy roco --budget 0.5 --stride 64
run7b roco_unfused cuda-unfused 90 --prompt-tokens 4096 --new-tokens 8 --chunk-size 4096 --policy roco --budget 0.5 --stride 64
run7b full4096_unfused cuda-unfused 60 --prompt-tokens 4096 --new-tokens 8 --chunk-size 4096
# Profiled (every kernel timed on the device, launches made blocking).
mkdir -p /tmp/prof && cd /tmp/prof
printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/prof/%s.log"\nappend = false\n' dec > cubecl.toml
run7b prof_dec cuda 60 --prompt-tokens 512 --new-tokens 8
printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/prof/%s.log"\nappend = false\n' roco > cubecl.toml
run7b prof_roco cuda 90 --prompt-tokens 4096 --new-tokens 2 --chunk-size 4096 --policy roco --budget 0.5 --stride 64
rm cubecl.toml; cd - >/dev/null
ls -la /tmp/prof
tail -c 15000000 /tmp/prof/dec.log | xz > $OUT/prof_dec.log.xz; tail -c 60000000 /tmp/prof/roco.log | xz > $OUT/prof_roco.log.xz
ls -la $OUT
# wgpu (Vulkan loader unpacked from the carried .debs).
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
t0=$(date +%s)
timeout 100 $B bench --device wgpu --random-weights smollm2 --prompt-tokens 64 --new-tokens 16 --repeat 1 2>&1 | tail -4
echo "wgpu smoke $(( $(date +%s) - t0 )) s"
run7b dec_wgpu wgpu 100 --prompt-tokens 512 --new-tokens 64
