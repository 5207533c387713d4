#!/usr/bin/env bash
# Device run F4: kernel cases and whole random-weight models (each kernel alone, then all)
# against burn's operations; then 7B timings with the kernels whose model runs matched.
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
mkdir -p $EASYKV_HOME && [ -f .gpu/kernels.tar.xz ] && tar -C $EASYKV_HOME -xJf .gpu/kernels.tar.xz
cp .gpu/smol.part00 /tmp/ 2>/dev/null
timeout 200 /tmp/easykv check-kernels --device cuda --json > /tmp/checks.json 2>/tmp/checks.err; tail -2 /tmp/checks.err
python3 - <<'PY'
import json
d = json.load(open('/tmp/checks.json'))
for c in d['kernels']:
    print(f"{c['dtype']:4} {c['kernel']:17} {'ok ' if c['passed'] else 'BAD'} {c['max_abs_diff']}")
    if not c['passed']:
        for case in c['cases']: print('      ', case[:300])
bad = set()
for m in d['models']:
    print(f"{m['dtype']:4} {m['model']:13} {m['kernels']:11} {'ok ' if m['passed'] else 'BAD'} {m['max_logit_diff']}")
    if not m['passed'] and m['kernels'] != 'all': bad.add(m['kernels'])
names = ['rms_norm', 'softmax', 'swiglu', 'split_rope', 'gemv', 'attention']
bad |= {c['kernel'].replace('_scores', '').replace('_values', '') for c in d['kernels'] if not c['passed']}
ok = [n for n in names if n not in bad]
open('/tmp/ok_kernels', 'w').write(','.join(ok) or 'off')
print('kernels for the timings:', ok)
PY
export DEV=cuda EASYKV_GPU_KERNELS=$(cat /tmp/ok_kernels)
PROMPT="--prompt-tokens 512" NEW="--new-tokens 64" CHUNK="--chunk-size 512" BENCH_TIMEOUT=60 bench7b dec
BENCH_TIMEOUT=70 bench7b full
BENCH_TIMEOUT=70 bench7b roco50 --policy roco --budget 0.5 --stride 64
tar -C $EASYKV_HOME -cJf $OUT/kernels.tar.xz kernels 2>/dev/null
# Device time per kernel over a short decode (launches made blocking by the profiler).
mkdir -p /tmp/prof && cd /tmp/prof
printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/prof/dec.log"\nappend = false\n' > cubecl.toml
timeout 60 /tmp/easykv bench --device cuda --random-weights llama2-7b --dtype f16 --prompt-tokens 16 --new-tokens 32 --repeat 1 --policy roco --budget 0.5 --stride 8 2>&1 | tail -2
rm cubecl.toml; cd - >/dev/null
awk -F'|' '{t=$2; gsub(/ /,"",t); v=t+0; if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; n=$3; gsub(/ +$/,"",n); s[n]+=v; c[n]++; tot+=v; all++} END {printf "total %.0f us over %d launches\n", tot, all; for (k in s) printf "%9.0f us %6d  %s\n", s[k], c[k], substr(k,1,90)}' /tmp/prof/dec.log | sort -rn | head -25
