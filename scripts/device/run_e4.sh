#!/usr/bin/env bash
# Device run E4 (same machine as E3 if still warm): wgpu with the GL vendor libraries, then
# SmolLM2 checks on wgpu and on CUDA without fusion (longer limits: first runs compile kernels).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/share/vulkan/icd.d/nvidia_icd.json
VK_LOADER_DEBUG=error timeout 100 /tmp/easykv bench --device wgpu --random-weights smollm2 --prompt-tokens 64 --new-tokens 16 --repeat 1 2>&1 | tail -4
V="python3 scripts/verify_device.py /tmp/easykv"
R="--model /tmp/smol.gguf --reference .gpu/smollm2-135m-q4_1.json"
if [ -f /tmp/smol.gguf ]; then
  if timeout 100 /tmp/easykv generate --device wgpu --model /tmp/smol.gguf --prompt "Say hi." --max-new-tokens 4 -q; then
    echo "== wgpu f32"; timeout 200 $V wgpu $R 2>&1 | tail -9
  fi
  echo "== cuda-unfused f16"; timeout 150 $V cuda-unfused $R --dtype f16 --tolerance 5e-2 2>&1 | tail -9
else echo "no model on this machine"; fi
