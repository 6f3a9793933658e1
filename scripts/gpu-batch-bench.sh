#!/usr/bin/env bash
# Decode batches of more than 16 sequences on the Llama-2-7B shape (4-bit):
# the W4A16 decode kernel once per slice of 16 rows (the default since
# session 11, up to 64 rows) against LMQ_W4_DECODE_ROWS=16, which
# dequantizes every weight for a cuBLAS GEMM at every step of such a batch;
# alternating, two rounds. Runs on the GPU machine from the repo root with the binaries of
# `scripts/gpu-smoke-check.sh --collect` in $BIN; about 3 minutes.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
BIN=${BIN:?BIN must name the folder of packed binaries}
gpu_env
R=/tmp/lmq-batch-bin
unpack "$BIN" "$R"
M=/tmp/lmq-batch-7b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$R/lmq" synth-model --preset llama2-7b --weights awq --out "$M" --quiet --force
bench() {
    "$R/lmq" bench --model "$M" --device cuda --kv-cache-bytes 16GiB --num-prompts "$((2 * $1))" \
        --concurrency "$1" --max-batch-size "$1" --input-len 128 --output-len 128 --json |
        python3 -c 'import json, sys
r = json.load(sys.stdin)
print("output %.0f tok/s, TPOT p50 %.2f ms" % (r["output_tok_per_s"], r["tpot_ms"]["p50"]))'
}
for batch in ${BATCHES:-32 48}; do
    for round in 1 2; do
        echo "batch $batch, round $round, LMQ_W4_DECODE_ROWS=16 (dequantize + GEMM): $(LMQ_W4_DECODE_ROWS=16 bench "$batch")"
        echo "batch $batch, round $round, default (decode kernel per 16 rows): $(bench "$batch")"
    done
done
