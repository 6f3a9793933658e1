#!/usr/bin/env bash
# Integer-KV paged attention on a CUDA machine (issue 6): the streaming
# kernel against the tile kernel, turbomind's CPU-against-CUDA parity tests
# (which use the default kernel, the tile kernel until the streaming one
# has passed here and is made the default), and bench_attn (every kernel variant,
# plus BASE's bench_attn before and after, when given). No Rust there:
# binaries are built here and carried, xz-compressed, in $BIN.
#
# Build and collect (on a machine with cargo), BASE optional:
#   cargo build --release -p lmq-kernels --examples
#   cargo test --release -p lmq-kernels --no-run
#   cargo test --release -p lmq-turbomind --test cuda_backend --no-run
#   BASE=/path/to/baseline/bench_attn scripts/gpu-attn-check.sh --collect
# On the GPU machine, from the repo root: bash scripts/gpu-attn-check.sh
# [test|bench|all]; logs go to $OUT (or /tmp/gpu-attn-check).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"

BIN=${BIN:-.device/attn}

if [[ "${1:-}" == "--collect" ]]; then
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$BIN"
    pack "$BIN" cuda_backend "$(newest "$target/release/deps/cuda_backend-*")"
    pack "$BIN" attn_stream "$(newest "$target/release/deps/attn_stream-*")"
    pack "$BIN" bench_attn "$target/release/examples/bench_attn"
    [[ -n "${BASE:-}" ]] && pack "$BIN" bench_attn_base "$BASE"
    ls -l "$BIN"
    exit 0
fi

gpu_env
LOG=${OUT:-/tmp/gpu-attn-check}
mkdir -p "$LOG"
RUN=/tmp/lmq-attn-bin
unpack "$BIN" "$RUN"
date -u
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true

MODE=${1:-all}
rc=0
if [[ $MODE == all || $MODE == test ]]; then
    timeout 180 "$RUN/attn_stream" --nocapture >"$LOG/attn_stream.log" 2>&1 || rc=1
    grep -E "test result|panicked" "$LOG/attn_stream.log"
    # The largest differences from the tile kernel.
    grep -E "split [0-9]+: " "$LOG/attn_stream.log" | sort -t: -k2 -g | tail -n 3
    timeout 300 "$RUN/cuda_backend" --test-threads=1 --nocapture >"$LOG/cuda_backend.log" 2>&1 || rc=1
    grep -E "^attention|test result|panicked" "$LOG/cuda_backend.log"
fi
if [[ $MODE == all || $MODE == bench ]]; then
    base="$RUN/bench_attn_base"
    [[ -x $base ]] && { echo "== baseline bench_attn"; "$base" 2>&1 | tee "$LOG/bench_base.log"; }
    echo "== bench_attn"
    "$RUN/bench_attn" 2>&1 | tee "$LOG/bench_attn.log"
    [[ -x $base ]] && { echo "== baseline bench_attn, again"; "$base" 2>&1 | tail -n 3 | tee -a "$LOG/bench_base.log"; }
fi
exit $rc
