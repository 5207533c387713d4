# Shared by the device scripts: unpack the binary, run one easykv bench with GPU memory sampled.
cd "$(dirname "$0")/../.."
if [ ! -x /tmp/easykv ]; then xz -dc .gpu/easykv.xz > /tmp/easykv && chmod +x /tmp/easykv; fi
export EASYKV_HOME=/tmp/easykv-home
# One configuration in its own process; peak device memory sampled by nvidia-smi every 50 ms.
bench7b() {
  local tag=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem.$tag &
  local smi=$!
  local t0=$(date +%s%N)
  timeout ${BENCH_TIMEOUT:-240} /tmp/easykv bench --device ${DEV:-cuda} --random-weights llama2-7b --dtype f16 \
    ${PROMPT:---prompt-tokens 4096} --repeat 1 --json ${NEW:---new-tokens 256} ${CHUNK:---chunk-size 4096} "$@" > /tmp/out.$tag 2> /tmp/err.$tag
  local rc=$?
  kill $smi; wait $smi 2>/dev/null
  local peak=$(sort -n /tmp/mem.$tag | tail -1)
  echo "== $tag rc=$rc wall_ms=$(( ($(date +%s%N) - t0) / 1000000 )) peak_mib=$peak"
  grep -E "warm-up|run 1|error" /tmp/err.$tag | head -5
  python3 -c "import json,sys; d=json.load(open('/tmp/out.$tag')); print(json.dumps({k:d.get(k) for k in ['policy','budget','prefill_tokens_per_second','decode_tokens_per_second','kv_cache_bytes','load_seconds']}))" 2>/dev/null
  [ "${KEEP_FILES:-1}" = 1 ] && cp /tmp/out.$tag /tmp/err.$tag $OUT/ 2>/dev/null
}
