#!/usr/bin/env bash
# How strongly KV-cache quantization amplifies a tiny upstream difference,
# on the CPU backend alone (docs/QUALITY.md, "KV quantization as an
# amplifier"): perplexity of SmolLM2-135M with every linear's input exact
# (`--w4-activations fp32`) against rounded to fp16 (`fp16`, relative
# ≤ 2⁻¹¹ per element), for fp16 and 4-bit (RTN g64) weights and fp16,
# int8 and int4 KV. The CUDA backend's difference from the CPU is of that
# size, so the spread this prints is the floor any backend that is not bit
# for bit the CPU's can reach.
#
#   bash scripts/kv-sensitivity.sh            (PPL_WINDOWS=8 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
LMQ=${LMQ:-target/release/lmq}
M=${MODELS:-/tmp/lmq-models}
W=${PPL_WINDOWS:-8}
[[ -x "$LMQ" ]] || cargo build --release -p lmq
mkdir -p "$M"
# The fp16 import (fetched and imported once per machine), and the 4-bit
# checkpoint with static int8 KV parameters that gpu-engine-check.sh makes.
FP16=$(bash scripts/fetch-model.sh smollm2-135m) || exit 1
if [[ ! -f "$M/w4/config.json" ]]; then
    "$LMQ" quantize --model "$FP16" --out "$M/w4" --method rtn --group-size 64 --kv int8 \
        --calib-samples 16 --calib-seqlen 256 --quiet || exit 1
fi
ppl() {
    local model="$M/$1"
    [[ $1 == fp16 ]] && model=$FP16
    "$LMQ" eval ppl --model "$model" --text calib_data/eval.txt --ctx 512 --max-windows "$W" --json \
        --kv-cache-dtype "$2" --kv-cache-mode "$3" --w4-activations "$4" --lm-head-dtype fp16 \
        --device cpu 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])'
}
echo "| weights | KV | ppl, inputs fp32 | ppl, inputs fp16 | Δ |"
echo "|---|---|---|---|---|"
for w in fp16 w4; do
    for kv in "fp16 online" "int8 online" "int4 online" "int8 static"; do
        set -- $kv
        [[ $w == fp16 && $2 == static ]] && continue
        a=$(ppl "$w" "$1" "$2" fp32)
        b=$(ppl "$w" "$1" "$2" fp16)
        if [[ -z "$a" || -z "$b" ]]; then
            echo "| $w | $1 $2 | eval ppl failed | | |"
            continue
        fi
        python3 -c "a,b=$a,$b; print(f'| $w | $1 $2 | {a:.4f} | {b:.4f} | {abs(a-b)/b*100:.4f}% |')"
    done
done
