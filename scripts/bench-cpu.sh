#!/usr/bin/env bash
# CPU side by side: lmq against llama.cpp on the same SmolLM2 GGUF at 4 bits,
# on this machine, in one run (the engine issue's bars). Needs a llama.cpp
# build (PEER_BIN: the folder with llama-bench and llama-batched-bench) and
# its Q4_0 requantization of the GGUF (PEER_GGUF), made with
#   llama-quantize --allow-requantize SmolLM2-135M-Instruct.Q4_1.gguf smollm2-q4_0.gguf Q4_0
# lmq runs the same GGUF imported by scripts/fetch-model.sh and quantized
# with `lmq quantize --method rtn --group-size 64` (AutoAWQ gemm layout).
# ROUNDS rounds alternate the two engines; every row is printed per round.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PEER_BIN=${PEER_BIN:-/work/peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
PEER_GGUF=${PEER_GGUF:-/work/peer/smollm2-q4_0.gguf}
ROUNDS=${ROUNDS:-2}
LMQ=${LMQ:-target/release/lmq}
M=$(scripts/fetch-model.sh smollm2-135m)
Q=${TMPDIR:-/tmp}/lmq-bench-cpu-rtn
[[ -f "$Q/config.json" ]] || "$LMQ" quantize --model "$M" --out "$Q" --method rtn --group-size 64 --quiet --force
j() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print($1)"; }
for r in $(seq "$ROUNDS"); do
    echo "== round $r, $(date -u '+%H:%M:%S UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
    lat=$("$LMQ" bench --model "$Q" --input-len 512 --output-len 128 --latency --iterations 3 \
        --kv-cache-bytes 512M --kv-cache-dtype fp16 --measure-bandwidth --json 2>/dev/null)
    echo "lmq pp512 $(echo "$lat" | j 'round(d["prefill_tok_per_s"],1)') tok/s, decode after 512 $(echo "$lat" | j 'round(d["decode_tok_per_s"],1)') tok/s, $(echo "$lat" | j 'round(100*d["decode_fraction_of_bound"],1)')% of the bandwidth bound ($(echo "$lat" | j 'round(d["read_bandwidth_gb_per_s"],1)') GB/s, $(echo "$lat" | j 'round(d["decode_bytes_per_token"]/1e6,1)') MB/token)"
    lat1=$("$LMQ" bench --model "$Q" --input-len 1 --output-len 128 --latency --iterations 3 \
        --kv-cache-bytes 512M --kv-cache-dtype fp16 --json 2>/dev/null)
    echo "lmq decode from an empty cache $(echo "$lat1" | j 'round(d["decode_tok_per_s"],1)') tok/s"
    agg=$("$LMQ" bench --model "$Q" --input-len 128 --output-len 128 --num-prompts 16 --concurrency 16 \
        --kv-cache-bytes 512M --kv-cache-dtype fp16 --json 2>/dev/null)
    echo "lmq 16 sequences: $(echo "$agg" | j 'round(16/(d["tpot_ms"]["mean"]/1e3),1)') tok/s aggregate decode (16 / mean TPOT)"
    "$PEER_BIN/llama-bench" -m "$PEER_GGUF" -p 512 -n 128 -t 2 -r 3 2>/dev/null | grep -E "pp512|tg128"
    "$PEER_BIN/llama-bench" -m "$PEER_GGUF" -p 0 -n 128 -d 512 -t 2 -r 3 2>/dev/null | grep -E "tg128"
    "$PEER_BIN/llama-batched-bench" -m "$PEER_GGUF" -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 16 -t 2 2>/dev/null | grep -E "^\|\s+128"
done
