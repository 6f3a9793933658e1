#!/usr/bin/env bash
# The wgmma GEMM's split-K in the engine, on the Llama-2-7B shape (4-bit,
# random weights): decode batches of 128 (the 4096-wide linears at 128
# rows) and batch-1 prefill of 512-token prompts, with split-K off
# (LMQ_W4_WGMMA_SPLIT=1) and on (auto, the default since session 15),
# alternating, two rounds. Runs on an sm_90 GPU machine from the repo root
# with the binaries of `scripts/gpu-smoke-check.sh --collect` in $BIN
# (only lmq is needed); about 5 minutes. docs/BENCHMARKS.md, session 15.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
BIN=${BIN:?BIN must name the folder of packed binaries}
gpu_env
R=/tmp/lmq-split-bin
mkdir -p "$R"
xz -dc "$BIN/lmq.xz" >"$R/lmq" && chmod +x "$R/lmq"
M=/tmp/lmq-split-7b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$R/lmq" synth-model --preset llama2-7b --weights awq --out "$M" --quiet --force
# bench BATCH INPUT_LEN: 2 × BATCH prompts, BATCH at a time.
bench() {
    timeout 150 "$R/lmq" bench --model "$M" --device cuda --kv-cache-bytes 16GiB --num-prompts "$((2 * $1))" \
        --concurrency "$1" --max-batch-size "$1" --input-len "$2" --output-len 128 --json |
        python3 -c 'import json, sys
r = json.load(sys.stdin)
print("output %.0f tok/s, TPOT p50 %.2f ms, TTFT p50 %.1f ms" % (r["output_tok_per_s"], r["tpot_ms"]["p50"], r["ttft_ms"]["p50"]))'
}
for round in 1 2; do
    for split in 1 auto; do
        export LMQ_W4_WGMMA_SPLIT=$split
        echo "batch 128, round $round, LMQ_W4_WGMMA_SPLIT=$split: $(bench 128 128)"
        echo "batch 1, 512-token prompts, round $round, LMQ_W4_WGMMA_SPLIT=$split: $(bench 1 512)"
    done
done
