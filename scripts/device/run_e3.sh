#!/usr/bin/env bash
# Device run E3 (right after E2, same machine): SmolLM2 against the references on CUDA
# (unfused, f32 and f16), then the wgpu build (Vulkan loader from the carried .debs).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
cat /tmp/smol.part00 .gpu/smol.part01 > /tmp/smol.gguf
echo "$(sha256sum /tmp/smol.gguf | cut -c1-64) (want b179c952…)"
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
echo "== cuda-unfused f32"; timeout 150 $V cuda-unfused $R 2>&1 | tail -9
echo "== cuda-unfused f16 (tolerance 5e-2)"; timeout 120 $V cuda-unfused $R --dtype f16 --tolerance 5e-2 2>&1 | tail -9
echo "== wgpu"
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
ls /usr/local/nvidia/share/vulkan/icd.d/ /etc/vulkan/icd.d /usr/share/vulkan/icd.d 2>&1 | head
ldconfig -p | grep -i -E "libvulkan|GLX_nvidia|nvidia-glcore|nvidia-gpucomp" | head
icd=$(find / -name "nvidia_icd*.json" -not -path "/proc/*" 2>/dev/null | head -1)
if [ -z "$icd" ]; then
  lib=$(ldconfig -p | grep -o "/[^ ]*libGLX_nvidia.so.0" | head -1)
  icd=/tmp/nvidia_icd.json
  printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3.0"}}\n' "${lib:-libGLX_nvidia.so.0}" > $icd
fi
echo "ICD: $icd"; cat $icd
export VK_DRIVER_FILES=$icd VK_ICD_FILENAMES=$icd
VK_LOADER_DEBUG=error,warn timeout 90 /tmp/easykv bench --device wgpu --random-weights smollm2 --prompt-tokens 64 --new-tokens 16 --repeat 1 2>&1 | tail -6
if timeout 60 /tmp/easykv generate --device wgpu --model /tmp/smol.gguf --prompt "Say hi." --max-new-tokens 4 -q >/dev/null 2>&1; then
  echo "== wgpu f32"; timeout 150 $V wgpu $R 2>&1 | tail -9
  DEV=wgpu BENCH_TIMEOUT=100 NEW="--new-tokens 64" CHUNK="--chunk-size 512" PROMPT="--prompt-tokens 512" bench7b wgpu_7b 2>/dev/null
fi
