#!/usr/bin/env bash
# Whole-engine GPU check, run on a CUDA machine from the repo root (no Rust
# there: binaries are built here and carried, xz-compressed, in $BIN).
#
# Build and collect (on a machine with cargo):
#   cargo build --release && cargo build --release -p lmq-kernels --examples
#   cargo test --release -p lmq-turbomind --test cuda_backend --no-run
#   cargo test --release -p lmq-kernels --no-run
#   scripts/gpu-engine-check.sh --collect
# Model: SmolLM2-135M-Instruct's GGUF (scripts/fetch-model.sh downloads it),
# at $GGUF on the GPU machine (it is larger than one device transfer, so it
# may travel in parts: GGUF may name a file assembled beforehand).
#
# Steps, each logged under $OUT:
#  1. import the GGUF to fp16; make a 4-bit AutoAWQ-layout checkpoint
#     (`--method rtn --group-size 64 --kv int8`, for time: the layout and
#     the kernels are the same as AWQ's) with static int8 KV parameters;
#  2. op-level parity: kernels crate tests and turbomind's cuda_backend;
#  3. whole model, CPU backend against CUDA backend on the same machine
#     (the CPU on the numerics the GPU implements, `--w4-activations fp16
#     --lm-head-dtype fp16`: every linear's input rounded to fp16, fp32
#     products and sums; CPU_ACTIVATIONS=fp32 for its exact fp32 inputs;
#     its default int8-activation path is a different quantization):
#     greedy tokens for 5 prompts × 64 tokens, and perplexity (eval.txt,
#     ctx 512, $PPL_WINDOWS windows), for fp16 and 4-bit weights with fp16,
#     int8 and int4 KV (online), plus int8 static on the 4-bit checkpoint;
#     CUDA_B (e.g. "LMQ_DEFERRED_NORM=0": space-separated settings) adds
#     two columns: how many of the greedy outputs under those settings
#     equal the CUDA default's, and the CUDA perplexity under them, for
#     comparing a default's numerics with the path it replaced on the real
#     model (perplexity prefills whole windows, so a decode-only path such
#     as the deferred norm shows only in the greedy column);
#  4. benchmarks: paged decode attention (bench_attn), W4A16 (bench_w4),
#     and `lmq bench --latency` on both backends.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"

BIN=${BIN:-.device/bin}

if [[ "${1:-}" == "--collect" ]]; then
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$BIN"
    pack "$BIN" lmq "$target/release/lmq"
    pack "$BIN" cuda_backend "$(newest "$target/release/deps/cuda_backend-*")"
    pack "$BIN" parity "$(newest "$target/release/deps/parity-*")"
    pack "$BIN" unit "$(newest "$target/release/deps/lmq_kernels-*")"
    pack "$BIN" bench_w4 "$target/release/examples/bench_w4"
    pack "$BIN" bench_attn "$target/release/examples/bench_attn"
    pack "$BIN" bench_prefill "$target/release/examples/bench_prefill"
    ls -l "$BIN"
    exit 0
fi

LOG=${OUT:-/tmp/gpu-engine-check}
mkdir -p "$LOG"
gpu_env
RUN=/tmp/lmq-bin
unpack "$BIN" "$RUN"
LMQ="$RUN/lmq"
GGUF=${GGUF:-/tmp/lmq-model/SmolLM2-135M-Instruct.Q4_1.gguf}
PPL_WINDOWS=${PPL_WINDOWS:-8}
M=/tmp/lmq-models
mkdir -p "$M"

echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# 1. Checkpoints.
if [[ ! -f "$M/fp16/config.json" ]]; then
    "$LMQ" import-gguf "$GGUF" "$M/fp16" >"$LOG/import.log" 2>&1 || { cat "$LOG/import.log"; exit 1; }
fi
if [[ ! -f "$M/w4/config.json" ]]; then
    "$LMQ" quantize --model "$M/fp16" --out "$M/w4" --method rtn --group-size 64 --kv int8 \
        --calib-samples 16 --calib-seqlen 256 --quiet >"$LOG/quantize.log" 2>&1 || { cat "$LOG/quantize.log"; exit 1; }
fi

# 2. Op-level parity (ONLY_MODEL=1 skips it and the benchmarks).
unit_rc=0 parity_rc=0 backend_rc=0
[[ "${ONLY_MODEL:-0}" == 1 ]] || {
"$RUN/unit" --test-threads=2 >"$LOG/unit.log" 2>&1; unit_rc=$?
"$RUN/parity" --test-threads=1 --nocapture >"$LOG/parity.log" 2>&1; parity_rc=$?
"$RUN/cuda_backend" --test-threads=1 --nocapture >"$LOG/cuda_backend.log" 2>&1; backend_rc=$?
grep -E "max err|skipped|test result|panicked" "$LOG/cuda_backend.log"
}

# 3. Whole model, CPU against CUDA.
prompts=(
    "The capital of France is"
    "Write a short poem about the sea."
    "def fibonacci(n):"
    "In 1776, the thirteen colonies"
    "Explain why the sky is blue in one paragraph."
)
if [[ -n "${CUDA_B:-}" ]]; then
    echo "| weights | KV | greedy 5×64 identical | ppl CPU | ppl CUDA | Δ | greedy CUDA = CUDA with $CUDA_B | ppl CUDA, $CUDA_B |" >"$LOG/model.md"
    echo "|---|---|---|---|---|---|---|---|" >>"$LOG/model.md"
else
    echo "| weights | KV | greedy 5×64 identical | ppl CPU | ppl CUDA | Δ |" >"$LOG/model.md"
    echo "|---|---|---|---|---|---|" >>"$LOG/model.md"
fi
model_ok=0
for w in fp16 w4; do
    for kv in "fp16 online" "int8 online" "int4 online" "int8 static"; do
        set -- $kv
        [[ $w == fp16 && $2 == static ]] && continue
        flags=(--kv-cache-dtype "$1" --kv-cache-mode "$2")
        # The CPU with the GPU's numerics: every linear's input rounded to
        # fp16 (CPU_ACTIVATIONS=fp32 keeps its exact fp32 inputs instead).
        exact=(--w4-activations "${CPU_ACTIVATIONS:-fp16}" --lm-head-dtype fp16)
        same=0 same_b=0
        for i in "${!prompts[@]}"; do
            a=$("$LMQ" generate --model "$M/$w" --prompt "${prompts[$i]}" --max-tokens 64 --ignore-eos "${flags[@]}" "${exact[@]}" --device cpu 2>/dev/null)
            b=$("$LMQ" generate --model "$M/$w" --prompt "${prompts[$i]}" --max-tokens 64 --ignore-eos "${flags[@]}" --device cuda 2>>"$LOG/generate-cuda.err")
            if [[ -n "${CUDA_B:-}" ]]; then
                c=$(env $CUDA_B "$LMQ" generate --model "$M/$w" --prompt "${prompts[$i]}" --max-tokens 64 --ignore-eos "${flags[@]}" --device cuda 2>>"$LOG/generate-cuda.err")
                [[ "$b" == "$c" && -n "$b" ]] && same_b=$((same_b + 1))
            fi
            if [[ "$a" == "$b" && -n "$a" ]]; then
                same=$((same + 1))
            else
                printf '%s %s prompt %d differs:\n--- cpu\n%s\n--- cuda\n%s\n' "$w" "$kv" "$i" "$a" "$b" >>"$LOG/diffs.txt"
            fi
        done
        pc=$("$LMQ" eval ppl --model "$M/$w" --text calib_data/eval.txt --ctx 512 --max-windows "$PPL_WINDOWS" --json "${flags[@]}" "${exact[@]}" --device cpu 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')
        pg=$("$LMQ" eval ppl --model "$M/$w" --text calib_data/eval.txt --ctx 512 --max-windows "$PPL_WINDOWS" --json "${flags[@]}" --device cuda 2>>"$LOG/eval-cuda.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')
        d=$(python3 -c "print(f'{100*abs($pg-$pc)/$pc:.4f}%')" 2>/dev/null || echo "n/a")
        if [[ -n "${CUDA_B:-}" ]]; then
            pb=$(env $CUDA_B "$LMQ" eval ppl --model "$M/$w" --text calib_data/eval.txt --ctx 512 --max-windows "$PPL_WINDOWS" --json "${flags[@]}" --device cuda 2>>"$LOG/eval-cuda.err" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')
            echo "| $w | $kv | $same/5 | $pc | $pg | $d | $same_b/5 | $pb |" >>"$LOG/model.md"
        else
            echo "| $w | $kv | $same/5 | $pc | $pg | $d |" >>"$LOG/model.md"
        fi
        [[ $same -eq 5 ]] || model_ok=1
    done
done
cat "$LOG/model.md"
[[ -f "$LOG/diffs.txt" ]] && head -c 3000 "$LOG/diffs.txt"
tail -n 5 "$LOG/generate-cuda.err" "$LOG/eval-cuda.err" 2>/dev/null

# 4. Benchmarks.
[[ "${ONLY_MODEL:-0}" == 1 ]] && exit "$model_ok"
if command -v cuobjdump >/dev/null; then
    for f in "$LMQ_KERNEL_CACHE"/paged_attn*.cubin "$LMQ_KERNEL_CACHE"/attn_*.cubin; do
        cuobjdump -res-usage "$f" 2>/dev/null | grep -A1 -E "paged_attn_h(64|128)_(f16_g(1|4)|i8|i4)" | grep -E "Function|REG" | sed 's/^/  /'
    done >"$LOG/resources.txt"
    head -n 16 "$LOG/resources.txt"
fi
"$RUN/bench_attn" 2>&1 | tee "$LOG/bench_attn.log"
"$RUN/bench_prefill" 2>&1 | tee "$LOG/bench_prefill.log"
if [[ "${W4_BENCH:-0}" == 1 ]]; then
    "$RUN/bench_w4" >"$LOG/bench_w4.log" 2>&1
    grep -E "copy|^\|" "$LOG/bench_w4.log" | head -n 20
fi
for w in fp16 w4; do
    for dev in ${LATENCY_DEVICES:-cpu cuda}; do
        echo "lmq bench --latency $w on $dev:"
        "$LMQ" bench --model "$M/$w" --latency --input-len 512 --output-len 128 --device "$dev" 2>&1 | tail -n 4
    done
done | tee "$LOG/bench_latency.log"

status() { if [[ $1 -eq 0 ]]; then echo pass; else echo "FAIL ($1)"; fi; }
echo
echo "=== lmq engine GPU check ==="
echo "| step | result |"
echo "|---|---|"
echo "| kernels unit tests | $(status $unit_rc) |"
echo "| kernels parity tests | $(status $parity_rc) |"
echo "| CUDA backend parity | $(status $backend_rc) |"
echo "| whole model greedy identical | $(status $model_ok) |"
