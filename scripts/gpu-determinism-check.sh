#!/usr/bin/env bash
# Run-to-run determinism of greedy GPU output: each (binary, setting) pair
# generates the same 60 tokens five times with CUDA graphs on and five
# times with them off, and the md5 of each output is printed. A correct
# engine prints one hash per row (and the same hash for graphs on and
# off); a race prints several. A generation that fails prints FAIL and
# its exit status, and makes the script exit non-zero. Runs on the GPU
# machine from the repo root.
#
#   RUNS  "binary.xz setting" pairs separated by ';' (a setting is one or
#         more VAR=value joined by commas), e.g.
#         RUNS=".device/s8b/lmq.xz LMQ_PDL=1; .device/s8b/lmq.xz LMQ_PDL=0"
#   KV    KV cache dtype (default fp16)
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
gpu_env
W=/tmp/lmq-determinism
mkdir -p "$W"
IFS=';' read -ra pairs <<<"${RUNS:?set RUNS, see the header}"
first=${pairs[0]# }
first=${first%% *}
xz -dc "$first" >"$W/synth" && chmod +x "$W/synth"
"$W/synth" synth-model --preset smollm2-135m --weights awq --out "$W/model" --quiet --force
n=0
failed=0
for pair in "${pairs[@]}"; do
    read -r bin setting <<<"$pair"
    n=$((n + 1))
    xz -dc "$bin" >"$W/lmq$n" && chmod +x "$W/lmq$n"
    for graphs in 1 0; do
        hashes=""
        for _ in 1 2 3 4 5; do
            if env ${setting//,/ } LMQ_CUDA_GRAPHS=$graphs "$W/lmq$n" generate --model "$W/model" --device cuda \
                --kv-cache-dtype "${KV:-fp16}" --prompt "the quick brown fox" --max-tokens 60 --ignore-eos \
                >"$W/out" 2>"$W/err"; then
                hashes="$hashes $(md5sum <"$W/out" | cut -c1-8)"
            else
                hashes="$hashes FAIL($?)"
                failed=1
                tail -n 2 "$W/err" >&2
            fi
        done
        echo "$bin $setting graphs=$graphs:$hashes"
    done
done
exit $failed
