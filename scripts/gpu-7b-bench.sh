#!/usr/bin/env bash
# Batch-1 decode of Llama-shaped random-weight models on the GPU, as a
# fraction of the bandwidth bound (weight + KV bytes per token over the
# device-to-device copy bandwidth measured in the same call). Runs on the
# GPU machine from the repo root with the binaries of
# scripts/gpu-engine-check.sh --collect in $BIN (xz-compressed); writes no
# model to the repo.
#
#   PRESETS  synth-model presets to run (default: llama2-7b)
#   WEIGHTS  awq and/or fp16 (default: both)
#   BASELINE an xz-compressed lmq binary of another commit: each model is
#            then benchmarked with both binaries, alternating twice, and the
#            ratio of decode speeds printed (same card, same call).
#   INPUT_LEN prompt tokens per request (default 128; prefill runs its
#            linears at this many rows)
#   ENVS     space-separated environment settings (e.g. "LMQ_PDL=0
#            LMQ_PDL=1"; commas join several variables into one
#            setting: "A=1,B=1"): each binary then runs once under each,
#            the list repeated twice, so a switch is compared in one call.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
BIN=${BIN:-.device/bin}
gpu_env
RUN=/tmp/lmq-bin
unpack "$BIN" "$RUN"
binaries=("$RUN/lmq")
if [[ -n "${BASELINE:-}" ]]; then
    xz -dc "$BASELINE" >"$RUN/lmq-baseline" && chmod +x "$RUN/lmq-baseline"
    binaries=("$RUN/lmq" "$RUN/lmq-baseline" "$RUN/lmq" "$RUN/lmq-baseline")
fi
M=/tmp/lmq-synth
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
copy=$(LMQ_BENCH_COPY_ONLY=1 "$RUN/bench_attn" | tee /dev/stderr | sed -n 's/^copy: \([0-9]*\) GB\/s.*/\1/p')
for preset in ${PRESETS:-llama2-7b}; do
    for w in ${WEIGHTS:-awq fp16}; do
        /usr/bin/time -f "synth $preset $w: %e s" "$RUN/lmq" synth-model --preset "$preset" --weights "$w" --out "$M-$w" --quiet --force
        runs=()
        for bin in "${binaries[@]}"; do
            if [[ -n "${ENVS:-}" ]]; then
                for e in $ENVS $ENVS; do runs+=("$e|$bin"); done
            else
                runs+=("|$bin")
            fi
        done
        for run in "${runs[@]}"; do
            setting=${run%%|*} bin=${run#*|}
            out=$(env ${setting//,/ } "$bin" bench --model "$M-$w" --latency --input-len "${INPUT_LEN:-128}" --output-len 128 --iterations 3 \
                --device cuda --kv-cache-bytes 8GiB --json)
            name="$(basename "$bin")${setting:+ $setting}"
            echo "$preset $w $name: $out"
            python3 - "$preset" "$w" "$name" "$copy" "$out" <<'PY'
import json, sys
preset, w, name, copy, r = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5])
bound = copy * 1e9 / r["decode_bytes_per_token"]
print(f"| {preset}, {w}, {name} | {r['decode_bytes_per_token']/1e9:.3f} GB/token | prefill {r['prefill_tok_per_s']:.0f} tok/s | "
      f"decode {r['decode_tok_per_s']:.1f} tok/s | bound {bound:.0f} tok/s | {100*r['decode_tok_per_s']/bound:.0f}% |")
PY
        done
        rm -rf "$M-$w"
    done
done
