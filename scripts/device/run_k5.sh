#!/usr/bin/env bash
# Device run K5 (seventh session, last): the issue-5 table with the committed defaults (norm
# inline from `x·γ`, 4 rows per GEMV cube with plane sums, RoPE angles on the host for decode
# steps only — K3 ran them for prefill chunks too, and the evicting prefills lost ~5 %).
source "$(dirname "$0")/common.sh"  # (scripts/device/common.sh)
export KEEP_FILES=0
BENCH_TIMEOUT=150 bench7b full
BENCH_TIMEOUT=100 bench7b roco50 --policy roco --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b h2o50 --policy h2o --budget 0.5 --stride 64
BENCH_TIMEOUT=100 bench7b roco25 --policy roco --budget 0.25 --stride 64
BENCH_TIMEOUT=100 bench7b h2o25 --policy h2o --budget 0.25 --stride 64
