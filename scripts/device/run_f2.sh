#!/usr/bin/env bash
# Device run F2: every kernel case against burn's operations (where a failing one goes
# wrong); the kernels that pass are written to /tmp/ok_kernels for F3, and the 7B decode and
# evicting prefill are timed with just those.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
mkdir -p $EASYKV_HOME && [ -f .gpu/kernels.tar.xz ] && tar -C $EASYKV_HOME -xJf .gpu/kernels.tar.xz
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 120 /tmp/easykv check-kernels --device cuda -v 2>&1 | cut -c1-400
timeout 120 /tmp/easykv check-kernels --device cuda --json > /tmp/checks.json 2>/dev/null
python3 - <<'PY'
import json
checks = json.load(open('/tmp/checks.json'))
env = {'attention_scores': 'attention', 'attention_values': 'attention'}
failed = {env.get(c['kernel'], c['kernel']) for c in checks if not c['passed']}
ok = sorted({env.get(c['kernel'], c['kernel']) for c in checks} - failed)
open('/tmp/ok_kernels', 'w').write(','.join(ok) or 'off')
print('passing kernels:', ok, 'failing:', sorted(failed))
PY
export DEV=cuda EASYKV_GPU_KERNELS=$(cat /tmp/ok_kernels)
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=60 bench7b dec_ok
BENCH_TIMEOUT=70 bench7b full
BENCH_TIMEOUT=70 bench7b roco50 --policy roco --budget 0.5 --stride 64
tar -C $EASYKV_HOME -cJf $OUT/kernels.tar.xz kernels 2>/dev/null
