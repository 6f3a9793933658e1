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
#   TORCH    1: also run the plain-PyTorch reference
#            scripts/torch-llama-bench.py (fp16, static KV cache, decode
#            step in a CUDA graph) on each fp16 model with the same lengths,
#            twice, alternating with lmq's runs (a lone lmq run is then made
#            twice), its rows named "torch" and bounded by the bytes per
#            token of lmq's run on the same model. Needs python3 with torch.
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
        if [[ "${TORCH:-}" == 1 && "$w" == fp16 ]]; then
            # The reference goes after each half of lmq's runs, so that both
            # see the card in the same states; one lmq run has no halves,
            # so it is made twice.
            (( ${#runs[@]} == 1 )) && runs+=("${runs[0]}")
            half=$(( ${#runs[@]} / 2 ))
            runs=("${runs[@]:0:half}" "|torch" "${runs[@]:half}" "|torch")
        fi
        lmq_bytes=
        for run in "${runs[@]}"; do
            setting=${run%%|*} bin=${run#*|}
            if [[ "$bin" == torch ]]; then
                out=$(python3 "$(dirname "$0")/torch-llama-bench.py" --model "$M-$w" --input-len "${INPUT_LEN:-128}" --output-len 128 \
                    --iterations 3 --device cuda)
                name=torch
                # lmq's bytes per token for the same model, so that the two
                # rows' fractions of the bound compare directly.
                bytes=$lmq_bytes
            else
                out=$(env ${setting//,/ } "$bin" bench --model "$M-$w" --latency --input-len "${INPUT_LEN:-128}" --output-len 128 --iterations 3 \
                    --device cuda --kv-cache-bytes 8GiB --json)
                name="$(basename "$bin")${setting:+ $setting}"
                bytes=
                lmq_bytes=$(sed -n 's/.*"decode_bytes_per_token":\([0-9]*\).*/\1/p' <<<"$out")
            fi
            echo "$preset $w $name: $out"
            if [[ -z "$out" ]]; then
                echo "| $preset, $w, $name | failed: no output |"
                continue
            fi
            python3 - "$preset" "$w" "$name" "$copy" "$out" "$bytes" <<'PY'
import json, sys
preset, w, name, copy, r = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5])
# The caller's bytes per token (lmq's, for a torch row) where given, else the
# run's own: the torch script counts them as lmq does (decoder linears and
# output projection, plus the KV of the mean context), for when lmq's failed.
per_token = float(sys.argv[6]) if sys.argv[6] else r["decode_bytes_per_token"]
bound = copy * 1e9 / per_token
print(f"| {preset}, {w}, {name} | {per_token/1e9:.3f} GB/token | prefill {r['prefill_tok_per_s']:.0f} tok/s | "
      f"decode {r['decode_tok_per_s']:.1f} tok/s | bound {bound:.0f} tok/s | {100*r['decode_tok_per_s']/bound:.0f}% |")
PY
        done
        rm -rf "$M-$w"
    done
done
