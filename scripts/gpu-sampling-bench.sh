#!/usr/bin/env bash
# The batching engine on a random-weight SmolLM2-shaped 4-bit model with
# sampled requests (temperature 0.8, top-p 0.95): tokens picked on the GPU
# against the host sampler (LMQ_DEVICE_SAMPLING=0) in the same call,
# alternating twice, then greedy requests both ways and, when present, with
# a baseline lmq binary ($BIN/lmq_base.xz). KV dtype: $KV (default int8). Runs on the GPU machine from the repo root
# with the binaries of `scripts/gpu-smoke-check.sh --collect` in $BIN.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
BIN=${BIN:-.device/smoke}
gpu_env
R=/tmp/lmq-sampling-bin
unpack "$BIN" "$R"
M=/tmp/lmq-sampling-s135
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$R/lmq" synth-model --preset smollm2-135m --weights awq --out "$M" --quiet --force
KV=${KV:-int8}
bench() {
    "$1" bench --model "$M" --device cuda --kv-cache-dtype "$KV" --num-prompts 128 --concurrency 64 \
        --input-len 128 --output-len 128 --max-batch-size 64 --json "${@:2}" |
        python3 -c 'import json, sys
r = json.load(sys.stdin)
print("output %.0f tok/s, TPOT p50 %.2f ms" % (r["output_tok_per_s"], r["tpot_ms"]["p50"]))'
}
for round in 1 2; do
    echo "round $round, sampled, GPU sampling: $(bench "$R/lmq" --temperature 0.8 --top-p 0.95)"
    echo "round $round, sampled, host sampling: $(LMQ_DEVICE_SAMPLING=0 bench "$R/lmq" --temperature 0.8 --top-p 0.95)"
done
echo "greedy, GPU argmax: $(bench "$R/lmq")"
echo "greedy, host argmax: $(LMQ_DEVICE_SAMPLING=0 bench "$R/lmq")"
# CUDA-graph batch buckets: the batch size changes as requests come and
# go; with buckets the steps replay one graph per bucket.
for round in 1 2; do
    echo "round $round, greedy, graph buckets on: $(LMQ_GRAPH_BUCKETS=1 bench "$R/lmq")"
    echo "round $round, greedy, graph buckets off: $(bench "$R/lmq")"
done
# The baseline binary has no sampling options: greedy only.
[[ -x "$R/lmq_base" ]] && echo "greedy, baseline binary: $(bench "$R/lmq_base")"
