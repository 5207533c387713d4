#!/usr/bin/env bash
# easykv on a GPU machine, by named configuration (docs/gpu.md says how to build and carry the
# binary). Run from the repository root on the device:
#
#   scripts/gpu.sh table     the Llama-2-7B-shape table: full cache, roco and h2o at 0.5 and 0.25
#   scripts/gpu.sh once      the kvpress-style policies cut once at 0.25 (snapkv, knorm, pyramidkv,
#                            expected-attention, ada-snapkv) beside the full cache, same shape (ROWS picks)
#   scripts/gpu.sh compare   rows of the table, this binary and a baseline binary alternating
#                            (ROWS picks them; default "full roco50")
#   scripts/gpu.sh check     every fused kernel against host references (easykv check-kernels)
#   scripts/gpu.sh time      the decode kernels timed at 7B shapes (check-kernels --time)
#   scripts/gpu.sh smollm2   SmolLM2 against the HF and EasyKV references (f32 chat and
#                            summarize, f16 chat)
#   scripts/gpu.sh hf        HF transformers with a static cache (bench/hf_baseline.py)
#   scripts/gpu.sh trace     where a roco 0.25 run's prefill chunks and decode steps go
#   scripts/gpu.sh prefill   one 7B-shape layer's prefill operations at PREFILL_ROWS (4096) tokens
#                            (check-kernels --time --prefill), PyTorch's on the same shapes and HF
#                            transformers' whole prefill (bench/prefill_torch.py), and the whole
#                            prefill's layers and cache steps for the full cache and roco 0.25
#   scripts/gpu.sh engine    REQUESTS (64) requests of 4096 + NEW (256) tokens through the batched
#                            engine in a 40 GiB KV pool, CONCURRENCY (64) at a time at most: full,
#                            roco 0.5, roco 0.25, h2o 0.25 (ENGINE_ROWS picks them; ENGINE_BINS
#                            "easykv-base easykv" runs each row with both binaries in turn)
#   scripts/gpu.sh serve     the same requests through HTTP: `easykv serve` and REQUESTS clients
#                            of `easykv bench serve` sending one request each (SERVE_ROWS)
#   scripts/gpu.sh hfbatch   HF transformers, 16 sequences of 4096 + NEW tokens at once with a
#                            static cache (the batched baseline)
#   scripts/gpu.sh ruler     the RULER-style evaluation of every policy at budgets 0.25 and 0.5 on
#                            RULER_MODEL (a .gguf; the model must be on the machine) at 4,096
#                            tokens, SAMPLES (50) per task, f16, into RULER_OUT (/tmp/ruler);
#                            results.json is saved after every cell, so a cut run resumes there
#   scripts/gpu.sh ruler-ab  AB_SAMPLES (3) niah_single samples of RULER_MODEL with easykv-base and
#                            easykv, two rounds: wall time, per-sample lines, outputs compared
#
# Several names run in order: `scripts/gpu.sh check table`.
#
# Files (git-ignored, under .gpu/): easykv.xz (the binary, `--features cuda`), easykv-base.xz
# (compare's baseline), kernels.tar.xz (a kernel cache of the same kernels' source, optional),
# smollm2.gguf and smollm2-135m-q4_1.json (smollm2). Environment: DEV (default cuda), MODELS
# (check's random-weight model shapes, default smollm2; qwen2.5-1.5b adds minutes),
# BENCH_TIMEOUT (seconds per row), EXTRA (flags for every row, e.g. "--gemv 8,0,2"), OUT (where
# outputs are copied; none when unset).
set -u
cd "$(dirname "$0")/.."
export EASYKV_HOME=${EASYKV_HOME:-/tmp/easykv-home}
# Where the binaries are unpacked: /tmp unless it is mounted without exec rights.
BIN=${BIN:-/tmp}
if ! { : > "$BIN/.exec-probe" && chmod +x "$BIN/.exec-probe" && "$BIN/.exec-probe"; } 2>/dev/null; then
  BIN=$PWD/.gpu/bin && mkdir -p "$BIN"
fi
OUT=${OUT:-}
unpack() { # unpack NAME: .gpu/NAME.xz → $BIN/NAME
  [ -x "$BIN/$1" ] || { xz -dc ".gpu/$1.xz" > "$BIN/$1" && chmod +x "$BIN/$1"; }
}
unpack easykv
if [ -f .gpu/kernels.tar.xz ] && [ ! -d "$EASYKV_HOME/kernels" ]; then
  mkdir -p "$EASYKV_HOME" && tar -C "$EASYKV_HOME" -xJf .gpu/kernels.tar.xz
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The table's rows: name, then flags.
declare -A ROW=(
  [full]=""
  [roco50]="--policy roco --budget 0.5 --stride 64"
  [h2o50]="--policy h2o --budget 0.5 --stride 64"
  [roco25]="--policy roco --budget 0.25 --stride 64"
  [h2o25]="--policy h2o --budget 0.25 --stride 64"
  # A quarter of the 4096-token prompt that generated tokens do not grow (evicted while decoding:
  # a slot per step, or 64 every 64 steps, which the pool's attention launch observes).
  [roco25auto]="--policy roco --budget 1024 --mode auto --stride 64"
  [roco25auto64]="--policy roco --budget 1024 --mode auto --stride 64 --decode-stride 64"
  [h2o25auto64]="--policy h2o --budget 1024 --mode auto --stride 64 --decode-stride 64"
  # The engine's prompts in passes of their own instead of riding in the decode steps' passes.
  [fullsep]="--prefill-passes separate"
  [roco25auto64sep]="--policy roco --budget 1024 --mode auto --stride 64 --decode-stride 64 --prefill-passes separate"
  [snapkv25]="--policy snapkv --budget 0.25 --mode once"
  [knorm25]="--policy knorm --budget 0.25 --mode once"
  [pyramidkv25]="--policy pyramidkv --budget 0.25 --mode once"
  [expected25]="--policy expected-attention --budget 0.25 --mode once"
  # Per-head budgets: each head's slots in buffers of their own after the cut.
  [adasnapkv25]="--policy ada-snapkv --budget 0.25 --mode once"
)

# bench BINARY TAG ROW: one row in its own process, peak device memory sampled every 50 ms.
bench() {
  local bin=$1 tag=$2 row=$3
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "/tmp/mem.$tag" &
  local smi=$!
  # shellcheck disable=SC2086 # flags are word lists
  timeout "${BENCH_TIMEOUT:-200}" "$bin" bench --device "${DEV:-cuda}" --random-weights llama2-7b --dtype f16 \
    --prompt-tokens 4096 --new-tokens 256 --chunk-size 4096 --repeat 1 --json ${ROW[$row]} ${EXTRA:-} \
    > "/tmp/out.$tag" 2> "/tmp/err.$tag"
  local rc=$?
  kill "$smi"; wait "$smi" 2>/dev/null
  python3 - "$tag" "$rc" "$(sort -n "/tmp/mem.$tag" | tail -1)" <<'EOF'
import json, sys
tag, rc, peak = sys.argv[1:]
try:
    d = json.load(open(f"/tmp/out.{tag}"))
    prefill = d["prompt_tokens"] / d["prefill_tokens_per_second"]
    print(f"{tag:<16} rc={rc} prefill {prefill:.3f} s  decode {d['decode_tokens_per_second']:.1f} tok/s  "
          f"KV {d['kv_cache_bytes'] / 1e9:.2f} GB  peak {int(peak) / 1024:.1f} GiB")
except Exception as e:
    print(f"{tag:<16} rc={rc} no result ({e}); stderr:")
    print(open(f"/tmp/err.{tag}").read()[-600:])
EOF
  [ -n "$OUT" ] && cp "/tmp/out.$tag" "$OUT/" 2>/dev/null
  return 0
}

for config in "$@"; do
  echo "== $config"
  case $config in
    table)
      for row in full roco50 h2o50 roco25 h2o25; do bench "$BIN/easykv" "$row" "$row"; done ;;
    once)
      for row in ${ROWS:-full snapkv25 knorm25 pyramidkv25 expected25 adasnapkv25}; do bench "$BIN/easykv" "$row" "$row"; done ;;
    compare)
      unpack easykv-base
      # Alternating A B A B per row: drift of the machine hits both binaries alike.
      for row in ${ROWS:-full roco50}; do
        for round in 1 2; do
          bench "$BIN/easykv-base" "base.$row.$round" "$row"
          bench "$BIN/easykv" "new.$row.$round" "$row"
        done
      done ;;
    check)
      timeout 400 "$BIN/easykv" check-kernels --device "${DEV:-cuda}" --models "${MODELS:-smollm2}" 2>&1 | cut -c1-300 \
        | grep -vE "^\s+[0-9]" ;;
    time)
      timeout 300 "$BIN/easykv" check-kernels --device "${DEV:-cuda}" --time --dtype f16 --slots 1088,2112 ;;
    smollm2)
      V="python3 scripts/verify_device.py $BIN/easykv"
      R="--model .gpu/smollm2.gguf --reference .gpu/smollm2-135m-q4_1.json"
      # shellcheck disable=SC2086
      {
        timeout 200 $V "${DEV:-cuda}" $R --checks chat | tail -8
        timeout 300 $V "${DEV:-cuda}" $R --checks summarize | tail -6
        timeout 200 $V "${DEV:-cuda}" $R --dtype f16 --tolerance 5e-2 --checks chat | tail -8
      } ;;
    hf)
      timeout 400 python3 bench/hf_baseline.py | tail -8 ;;
    engine)
      # ENGINE_BINS (default easykv) names binaries under .gpu/ to run each row with, in turn.
      for row in ${ENGINE_ROWS:-full roco50 roco25 h2o25}; do
       for bin in ${ENGINE_BINS:-easykv}; do
        unpack "$bin"
        tag=$row; [ "$bin" = easykv ] || tag="$bin.$row"
        # shellcheck disable=SC2086
        timeout "${BENCH_TIMEOUT:-280}" "$BIN/$bin" bench --device "${DEV:-cuda}" --random-weights llama2-7b --dtype f16 \
          --prompt-tokens 4096 --new-tokens "${NEW:-256}" --chunk-size 4096 --requests "${REQUESTS:-64}" --concurrency "${CONCURRENCY:-64}" \
          --kv-pool 40GiB --json ${ROW[$row]} ${EXTRA:-} > "/tmp/engine.$tag" 2> "/tmp/engine_err.$tag"
        python3 - "$tag" <<'EOF2'
import json, sys
row = sys.argv[1]
try:
    d = json.load(open(f"/tmp/engine.{row}"))
    print(f"{row:<8} {d['output_tokens_per_second']:.1f} tok/s in {d['seconds']:.1f} s, in flight {d['max_in_flight']}, "
          f"TTFT p50 {d['ttft_ms_p50']:.0f} ms, ITL p50 {d['itl_ms_p50']:.1f} ms p99 {d['itl_ms_p99']:.1f} ms, "
          f"peak KV {d['peak_kv_bytes'] / 2**30:.1f} GiB")
except Exception as e:
    print(f"{row:<8} no result ({e}):", open(f"/tmp/engine_err.{row}").read()[-400:])
EOF2
        [ -n "$OUT" ] && cp "/tmp/engine.$tag" "$OUT/" 2>/dev/null
       done
      done ;;
    serve)
      for row in ${SERVE_ROWS:-roco25}; do
        # shellcheck disable=SC2086
        "$BIN/easykv" serve --device "${DEV:-cuda}" --random-weights llama2-7b --dtype f16 --port 8300 --quiet \
          --kv-pool 40GiB --max-concurrent 64 --chunk-size 4096 ${ROW[$row]} ${EXTRA:-} 2> "/tmp/serve_err.$row" &
        local_server=$!
        # Each client sends one request (the deadline passes while it runs).
        timeout "${BENCH_TIMEOUT:-280}" "$BIN/easykv" bench serve --url http://127.0.0.1:8300 --clients "${REQUESTS:-64}" \
          --duration 1 --warmup 0 --prompt-tokens 4096 --max-tokens "${NEW:-256}" --wait 200 --json > "/tmp/serve.$row"
        kill -INT "$local_server"; wait "$local_server" 2>/dev/null
        python3 - "$row" <<'EOF2'
import json, sys
row = sys.argv[1]
try:
    d = json.load(open(f"/tmp/serve.{row}"))
    print(f"{row:<8} HTTP {d['output_tokens_per_second']:.1f} tok/s in {d['seconds']:.1f} s, {d['requests']} requests, "
          f"{d['errors']} errors, TTFT p50 {d['ttft_ms_p50']:.0f} ms, ITL p50 {d['itl_ms_p50']:.1f} ms p99 {d['itl_ms_p99']:.1f} ms, "
          f"RSS max {d['rss_mib_max']:.0f} MiB")
except Exception as e:
    print(f"{row:<8} no result ({e}):", open(f"/tmp/serve_err.{row}").read()[-400:])
EOF2
        [ -n "$OUT" ] && cp "/tmp/serve.$row" "$OUT/" 2>/dev/null
      done ;;
    hfbatch)
      timeout 500 python3 bench/hf_baseline.py --batch 16 --new-tokens "${NEW:-256}" | tail -2 ;;
    trace)
      RUST_LOG=easykv::chunks=debug timeout 200 "$BIN/easykv" bench --device "${DEV:-cuda}" --random-weights llama2-7b \
        --dtype f16 --prompt-tokens 4096 --new-tokens 24 --chunk-size 4096 --repeat 1 --policy roco --budget 0.25 \
        --stride 64 2>&1 | grep -E "chunk" | tail -8 ;;
    prefill)
      timeout 300 "$BIN/easykv" check-kernels --device "${DEV:-cuda}" --time --prefill "${PREFILL_ROWS:-4096}" --dtype f16
      timeout 300 python3 bench/prefill_torch.py --rows "${PREFILL_ROWS:-4096}" --model
      for row in full roco25; do
        echo "-- $row: prefill chunks (layers_ms, cache_ms)"
        # shellcheck disable=SC2086
        RUST_LOG=easykv::chunks=debug timeout 200 "$BIN/easykv" bench --device "${DEV:-cuda}" --random-weights llama2-7b \
          --dtype f16 --prompt-tokens 4096 --new-tokens 2 --chunk-size 4096 --repeat 1 ${ROW[$row]} ${EXTRA:-} 2>&1 \
          | grep -E " chunk " | awk '{n++; for (i = 1; i <= NF; i++) { split($i, kv, "=");
              if (kv[1] == "layers_ms") l += kv[2]; if (kv[1] == "cache_ms") c += kv[2] } }
              END { printf "%d chunk records: layers %.1f ms, cache steps %.1f ms\n", n, l, c }'
      done ;;
    ruler)
      RUST_LOG=${RUST_LOG:-easykv::eval=debug} "$BIN/easykv" eval ruler --device "${DEV:-cuda}" --dtype f16 --model "${RULER_MODEL:?a .gguf file}" \
        --lengths 4096 --samples "${SAMPLES:-50}" --mode once --budgets 0.25,0.5 --out "${RULER_OUT:-/tmp/ruler}" ;;
    ruler-ab)
      # The same AB_SAMPLES (3) niah_single samples with easykv-base and easykv, alternating:
      # wall time, each sample's prefill/decode line, and whether every cell's output agrees.
      unpack easykv-base
      for round in 1 2; do
        for bin in easykv-base easykv; do
          rm -rf "/tmp/ab.$bin"
          start=$(date +%s%N)
          RUST_LOG=easykv::eval=debug,easykv_models::eval=debug "$BIN/$bin" eval niah_single --device "${DEV:-cuda}" \
            --dtype f16 --model "${RULER_MODEL:?a .gguf file}" --lengths 4096 --samples "${AB_SAMPLES:-3}" --mode once \
            --budgets 0.25,0.5 --out "/tmp/ab.$bin" -q > /dev/null 2> "/tmp/ab.$bin.log"
          echo "$bin round $round: rc=$? $(( ($(date +%s%N) - start) / 1000000 )) ms"
          grep -a "prefill (and" "/tmp/ab.$bin.log" | sed 's/^.*DEBUG //' | cut -c1-160
        done
      done
      python3 - <<'EOF2'
import json
a, b = (json.load(open(f"/tmp/ab.{n}/results.json"))["cells"] for n in ("easykv-base", "easykv"))
key = lambda c: (c["task"], c["sample"], c["policy"], c["budget"])
b = {key(c): c["output"] for c in b}
same = sum(b.get(key(c)) == c["output"] for c in a)
print(f"outputs equal in {same} of {len(a)} cells")
EOF2
      ;;
    *)
      echo "unknown configuration '$config' (table, once, compare, check, time, smollm2, hf, hfbatch, trace, engine, serve, prefill, ruler, ruler-ab)"; exit 2 ;;
  esac
done
if [ -n "$OUT" ] && [ -d "$EASYKV_HOME/kernels" ]; then tar -C "$EASYKV_HOME" -cJf "$OUT/kernels.tar.xz" kernels; fi
