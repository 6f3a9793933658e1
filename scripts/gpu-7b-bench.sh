#!/usr/bin/env bash
# Batch-1 decode of a Llama-2-7B-shaped model on the GPU, as a fraction of
# the bandwidth bound (weight + KV bytes per token over the device-to-device
# copy bandwidth measured in the same call). Runs on the GPU machine from
# the repo root with the binaries of scripts/gpu-engine-check.sh --collect
# in $BIN (xz-compressed); writes no model to the repo.
set -uo pipefail
BIN=${BIN:-.device/bin}
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH LMQ_KERNEL_CACHE=${LMQ_KERNEL_CACHE:-/tmp/lmq-kernel-cache}
RUN=/tmp/lmq-bin
mkdir -p "$RUN"
for f in "$BIN"/*.xz; do xz -dc "$f" >"$RUN/$(basename "$f" .xz)"; chmod +x "$RUN/$(basename "$f" .xz)"; done
M=/tmp/lmq-7b
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
copy=$("$RUN/bench_attn" | tee /dev/stderr | sed -n 's/^copy: \([0-9]*\) GB\/s.*/\1/p')
for w in ${WEIGHTS:-awq fp16}; do
    /usr/bin/time -f "synth $w: %e s" "$RUN/lmq" synth-model --preset llama2-7b --weights "$w" --out "$M-$w" --quiet --force
    out=$("$RUN/lmq" bench --model "$M-$w" --latency --input-len 128 --output-len 128 --iterations 3 \
        --device cuda --kv-cache-bytes 8GiB --json)
    echo "$w: $out"
    python3 - "$w" "$copy" "$out" <<'PY'
import json, sys
w, copy, r = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
bound = copy * 1e9 / r["decode_bytes_per_token"]
print(f"| Llama-2-7B shape, {w} | {r['decode_bytes_per_token']/1e9:.2f} GB/token | prefill {r['prefill_tok_per_s']:.0f} tok/s | "
      f"decode {r['decode_tok_per_s']:.1f} tok/s | bound {bound:.0f} tok/s | {100*r['decode_tok_per_s']/bound:.0f}% |")
PY
    rm -rf "$M-$w"
done
