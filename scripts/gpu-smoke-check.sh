#!/usr/bin/env bash
# One short device call that checks a merged main on a CUDA machine before
# anything is timed: every CUDA test binary (op parity against the CPU
# backend, the CUDA-graph tests with and without batch buckets, device
# sampling against the host sampler, the streaming integer-attention
# kernel against the tile kernel, the prefill attention kernel, PDL against
# a producer still writing, eagerly and spliced into a graph, the kernels
# crate's own tests), then greedy
# output with CUDA graphs on and off on a random-weight SmolLM2-shaped
# 4-bit model (fp16 and int8 KV), then bench_attn (skip with SKIP_BENCH=1).
# No Rust there: binaries are built here and carried, xz-compressed, in
# $BIN (git-ignored .device/, named in the device call's `carry`).
#
# Build and collect (on a machine with cargo; BASE optional, a baseline
# bench_attn binary to time before the new one; BASE_LMQ optional, a
# baseline lmq binary whose greedy output must equal the new one's):
#   cargo build --release && cargo build --release -p lmq-kernels --examples
#   cargo test --release -p lmq-kernels --no-run   (includes attn_prefill)
#   cargo test --release -p lmq-turbomind --test cuda_backend --test cuda_sampling --test cuda_graph_buckets --test cuda_gate_up --test cuda_deferred_norm --no-run
#   BASE=/path/to/old/bench_attn scripts/gpu-smoke-check.sh --collect
# Optionally also pack, as pdl_old, tests/pdl.rs built against the W4A16
# kernels before the PDL fix (cu/w4a16.cu of 13214ae: check it out, build
# the test with --no-run, pack it with gpu-lib.sh's `pack`, restore): it
# should fail, which shows the test can catch the race.
# On the GPU machine, from the repo root: bash scripts/gpu-smoke-check.sh
# (logs in /tmp/gpu-smoke-check, archived to $OUT/smoke-logs.tar.gz).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"

BIN=${BIN:-.device/smoke}

if [[ "${1:-}" == "--collect" ]]; then
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$BIN"
    pack "$BIN" cuda_backend "$(newest "$target/release/deps/cuda_backend-*")"
    pack "$BIN" cuda_sampling "$(newest "$target/release/deps/cuda_sampling-*")"
    pack "$BIN" cuda_graph_buckets "$(newest "$target/release/deps/cuda_graph_buckets-*")"
    pack "$BIN" attn_stream "$(newest "$target/release/deps/attn_stream-*")"
    pack "$BIN" attn_prefill "$(newest "$target/release/deps/attn_prefill-*")"
    pack "$BIN" pdl "$(newest "$target/release/deps/pdl-*")"
    pack "$BIN" rope_kv "$(newest "$target/release/deps/rope_kv-*")"
    pack "$BIN" dequant "$(newest "$target/release/deps/dequant-*")"
    pack "$BIN" w4_gemm "$(newest "$target/release/deps/w4_gemm-*")"
    pack "$BIN" silu_pairs "$(newest "$target/release/deps/silu_pairs-*")"
    pack "$BIN" cuda_gate_up "$(newest "$target/release/deps/cuda_gate_up-*")"
    pack "$BIN" cuda_deferred_norm "$(newest "$target/release/deps/cuda_deferred_norm-*")"
    pack "$BIN" deferred_norm "$(newest "$target/release/deps/deferred_norm-*")"
    pack "$BIN" bench_attn_prefill "$target/release/examples/bench_attn_prefill"
    pack "$BIN" unit "$(newest "$target/release/deps/lmq_kernels-*")"
    pack "$BIN" parity "$(newest "$target/release/deps/parity-*")"
    pack "$BIN" bench_attn "$target/release/examples/bench_attn"
    pack "$BIN" bench_w4 "$target/release/examples/bench_w4"
    pack "$BIN" bench_prefill "$target/release/examples/bench_prefill"
    pack "$BIN" lmq "$target/release/lmq"
    [[ -n "${BASE:-}" ]] && pack "$BIN" bench_attn_base "$BASE"
    [[ -n "${BASE_LMQ:-}" ]] && pack "$BIN" lmq_base "$BASE_LMQ"
    ls -l "$BIN"
    exit 0
fi

gpu_env
# Logs stay in /tmp; one archive of them goes to $OUT (the device tool
# returns only a few files).
LOG=/tmp/gpu-smoke-check
mkdir -p "$LOG"
R=/tmp/lmq-smoke-bin
unpack "$BIN" "$R"
date -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

rc=0
run_test() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$R/$name" "$@" >"$LOG/$name.log" 2>&1 || rc=1
    grep -E "test result|panicked" "$LOG/$name.log"
}
run_test cuda_backend 200 --test-threads=1 --nocapture
echo "== cuda_backend, attention with LMQ_SMOOTH_CENTRED=1 (smooth mode on the centred streaming kernel; reported, not required: it failed its int4 bound on an H100)"
LMQ_SMOOTH_CENTRED=1 timeout 120 "$R/cuda_backend" paged_attention --test-threads=1 --nocapture \
    >"$LOG/cuda_backend_smooth_centred.log" 2>&1
grep -E "test result|panicked|smooth" "$LOG/cuda_backend_smooth_centred.log" | head -n 20
run_test cuda_graph_buckets 100 --nocapture
grep -E "graphs recorded" "$LOG/cuda_graph_buckets.log"
run_test cuda_sampling 100 --nocapture
grep -E "sampled rows on the device" "$LOG/cuda_sampling.log"
run_test attn_stream 100 --nocapture
grep -E "split [0-9]+: " "$LOG/attn_stream.log" | sort -t: -k2 -g | tail -n 3
run_test pdl 100 --nocapture
grep -E "PDL rounds differ|spliced graph|panicked" "$LOG/pdl.log"
if [[ -x "$R/pdl_old" ]]; then
    # The same test built against the kernels before the PDL fix: it should
    # fail (reported, not required), which shows it can catch the race.
    echo "== pdl test, kernels before the fix (expected to fail)"
    timeout 100 "$R/pdl_old" --nocapture >"$LOG/pdl_old.log" 2>&1
    grep -E "PDL rounds differ|test result" "$LOG/pdl_old.log"
fi
run_test rope_kv 60 --nocapture
echo "$(grep -c "pool bytes identical" "$LOG/rope_kv.log") cases: fused rope + KV write = split_rope then kv_write, bit for bit"
if [[ -x "$R/w4_gemm" ]]; then
    run_test w4_gemm 60 --nocapture
    grep -E "wgmma m|cases on|refused" "$LOG/w4_gemm.log"
    echo "== cuda_backend linears with LMQ_W4_WGMMA=1 (4-bit prefill by the wgmma GEMM where it takes the layer)"
    LMQ_W4_WGMMA=1 timeout 60 "$R/cuda_backend" linears_match_cpu --test-threads=1 --nocapture \
        >"$LOG/cuda_backend_wgmma.log" 2>&1 || rc=1
    grep -E "test result|panicked|256->512" "$LOG/cuda_backend_wgmma.log"
fi
if [[ -x "$R/dequant" ]]; then
    run_test dequant 60 --nocapture
    echo "== cuda_backend linears with LMQ_W4_DECODE_ROWS=16 (17 rows and more: dequantize + cuBLAS, the default's slices off)"
    LMQ_W4_DECODE_ROWS=16 timeout 60 "$R/cuda_backend" linears_match_cpu --test-threads=1 --nocapture \
        >"$LOG/cuda_backend_rows.log" 2>&1 || rc=1
    grep -E "test result|panicked" "$LOG/cuda_backend_rows.log"
fi
if [[ -x "$R/silu_pairs" ]]; then
    run_test silu_pairs 60 --nocapture
    echo "$(grep -c ": identical" "$LOG/silu_pairs.log") cases: gate/up GEMV storing silu(gate)·up = GEMV then silu_mul_halves, bit for bit"
fi
if [[ -x "$R/deferred_norm" ]]; then
    run_test deferred_norm 60 --nocapture
    run_test cuda_deferred_norm 90 --nocapture
    grep -E "16 rows, (q/k/v|silu)" "$LOG/cuda_deferred_norm.log"
fi
if [[ -x "$R/cuda_gate_up" ]]; then
    run_test cuda_gate_up 60 --nocapture
    grep -c "identical to the two ops" "$LOG/cuda_gate_up.log"
fi
run_test attn_prefill 100 --nocapture
grep -E "prefill vs decode" "$LOG/attn_prefill.log" | sort -k2 -t: -g | tail -n 3
echo "== attn_prefill and cuda_backend's attention with LMQ_PREFILL_INT_PIPE=0 (the plain integer prefill tiles)"
LMQ_PREFILL_INT_PIPE=0 timeout 100 "$R/attn_prefill" --nocapture >"$LOG/attn_prefill_plain.log" 2>&1 || rc=1
grep -E "test result|panicked" "$LOG/attn_prefill_plain.log"
grep -E "prefill vs decode" "$LOG/attn_prefill_plain.log" | sort -k2 -t: -g | tail -n 3
LMQ_PREFILL_INT_PIPE=0 LMQ_PREFILL_ATTN=always timeout 120 "$R/cuda_backend" paged_attention --test-threads=1 --nocapture \
    >"$LOG/cuda_backend_plain.log" 2>&1 || rc=1
grep -E "test result|panicked" "$LOG/cuda_backend_plain.log"
echo "== cuda_backend, attention and whole models with LMQ_PREFILL_ATTN=always (the prefill kernel on every run of 16 rows)"
LMQ_PREFILL_ATTN=always timeout 120 "$R/cuda_backend" paged_attention whole_model --test-threads=1 --nocapture \
    >"$LOG/cuda_backend_prefill.log" 2>&1 || rc=1
grep -E "test result|panicked|attention" "$LOG/cuda_backend_prefill.log" | head -n 40
run_test unit 60
run_test parity 60

# Long enough (over 16 tokens) for the prefill kernel to take the prompt.
LONG_PROMPT="It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity"
echo "== greedy output, CUDA graphs on and off"
timeout 60 "$R/lmq" synth-model --preset smollm2-135m --weights awq --out /tmp/lmq-smoke-s135 --quiet --force
for kv in fp16 int8; do
    gen() {
        timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
            --prompt "the quick brown fox" --max-tokens 200 --ignore-eos 2>>"$LOG/generate.err"
    }
    gen >"$LOG/graph-$kv.txt"
    LMQ_CUDA_GRAPHS=0 gen >"$LOG/eager-$kv.txt"
    if cmp -s "$LOG/graph-$kv.txt" "$LOG/eager-$kv.txt" && [[ -s "$LOG/graph-$kv.txt" ]]; then
        echo "$kv KV: graph = eager ($(wc -c <"$LOG/graph-$kv.txt") bytes)"
    else
        echo "$kv KV: graph and eager outputs differ (or are empty)"
        rc=1
    fi
    # Eager launches use PDL by default; without it the text must not
    # change. Neither may it without the fusions (default since session
    # 10: the fused rope + KV write, whose pool holds the same bytes; the
    # attention kernels' fp16 copy, the same values as the conversion
    # launch's; the gate/up GEMV storing silu(gate)·up), nor with the next
    # weights' L2 prefetch (it writes nothing).
    for setting in "LMQ_CUDA_GRAPHS=0 LMQ_PDL=0" "LMQ_FUSED_KV_WRITE=0 LMQ_ATTN_HALF=0 LMQ_FUSED_SILU=0" "LMQ_CUDA_GRAPHS=0 LMQ_FUSED_KV_WRITE=0 LMQ_ATTN_HALF=0 LMQ_FUSED_SILU=0" "LMQ_L2_PREFETCH=0"; do
        env $setting timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
            --prompt "the quick brown fox" --max-tokens 200 --ignore-eos >"$LOG/variant-$kv.txt" 2>>"$LOG/generate.err"
        if cmp -s "$LOG/graph-$kv.txt" "$LOG/variant-$kv.txt"; then
            echo "$kv KV: $setting = default"
        else
            echo "$kv KV: $setting differs from the default"
            rc=1
        fi
    done
    # Another reduction order (or rounding) may change near-tied
    # random-weight picks, so these are reported, not required: the
    # prefill attention kernel off, and the norms not deferred (their
    # linears' inputs are rounded at another point).
    LMQ_DEFERRED_NORM=0 gen >"$LOG/undeferred-$kv.txt"
    if cmp -s "$LOG/graph-$kv.txt" "$LOG/undeferred-$kv.txt"; then
        echo "$kv KV: LMQ_DEFERRED_NORM=0 = default"
    else
        echo "$kv KV: LMQ_DEFERRED_NORM=0 differs from the default after $(cmp "$LOG/graph-$kv.txt" "$LOG/undeferred-$kv.txt" | sed -n 's/.*byte \([0-9]*\).*/\1/p') bytes"
    fi
    LMQ_PREFILL_ATTN=0 timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
        --prompt "$LONG_PROMPT" --max-tokens 100 --ignore-eos >"$LOG/prefill-$kv.txt" 2>>"$LOG/generate.err"
    timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
        --prompt "$LONG_PROMPT" --max-tokens 100 --ignore-eos >"$LOG/long-$kv.txt" 2>>"$LOG/generate.err"
    if cmp -s "$LOG/prefill-$kv.txt" "$LOG/long-$kv.txt" && [[ -s "$LOG/long-$kv.txt" ]]; then
        echo "$kv KV, long prompt: LMQ_PREFILL_ATTN=0 = default ($(wc -c <"$LOG/long-$kv.txt") bytes)"
    else
        echo "$kv KV, long prompt: LMQ_PREFILL_ATTN=0 differs from the default after $(cmp "$LOG/prefill-$kv.txt" "$LOG/long-$kv.txt" | sed -n 's/.*byte \([0-9]*\).*/\1/p') bytes"
    fi
    # PDL changes no arithmetic, so its output must be the same (session 8
    # found a race that made it differ; kernels/tests/pdl.rs is its test).
    for i in 1 2 3; do
        LMQ_PDL=1 gen >"$LOG/pdl-$kv.txt"
        if cmp -s "$LOG/graph-$kv.txt" "$LOG/pdl-$kv.txt"; then
            echo "$kv KV: LMQ_PDL=1 = default (run $i)"
        else
            echo "$kv KV: LMQ_PDL=1 differs from the default after $(cmp "$LOG/graph-$kv.txt" "$LOG/pdl-$kv.txt" | sed -n 's/.*byte \([0-9]*\).*/\1/p') bytes (run $i)"
            rc=1
        fi
    done
    # With PDL the recorded steps should gain programmatic edges
    # (kernels/src/graph_pdl.rs); the binary says how many, once. Graphs
    # turned off would show here too.
    said=$(LMQ_PDL=1 timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
        --prompt "the quick brown fox" --max-tokens 200 --ignore-eos 2>&1 >/dev/null)
    echo "$said" | grep -E "programmatic edges|graphs turned off"
    if ! echo "$said" | grep -q "programmatic edges" || echo "$said" | grep -q "graphs turned off"; then
        echo "$kv KV: LMQ_PDL=1 spliced no programmatic edges, or turned graphs off"
        rc=1
    fi
    if [[ -x "$R/lmq_base" ]]; then
        timeout 40 "$R/lmq_base" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
            --prompt "the quick brown fox" --max-tokens 200 --ignore-eos >"$LOG/base-$kv.txt" 2>>"$LOG/generate.err"
        # The baseline (f4efa19 in the packed folders since session 11)
        # predates the deferred norm, which rounds elsewhere: it is held
        # to the new binary without it.
        if cmp -s "$LOG/undeferred-$kv.txt" "$LOG/base-$kv.txt"; then
            echo "$kv KV: new (LMQ_DEFERRED_NORM=0) = baseline binary"
        else
            echo "$kv KV: new (LMQ_DEFERRED_NORM=0) and baseline binary outputs differ"
            rc=1
        fi
    fi
done

echo "== seeded sampling, on the device and on the host"
for kv in fp16; do
    sam() {
        timeout 40 "$R/lmq" generate --model /tmp/lmq-smoke-s135 --device cuda --kv-cache-dtype "$kv" \
            --prompt "the quick brown fox" --max-tokens 200 --ignore-eos --temperature 0.8 --top-p 0.95 \
            --repetition-penalty 1.1 --seed 7 2>>"$LOG/generate.err"
    }
    sam >"$LOG/sample-device.txt"
    LMQ_DEVICE_SAMPLING=0 sam >"$LOG/sample-host.txt"
    if cmp -s "$LOG/sample-device.txt" "$LOG/sample-host.txt" && [[ -s "$LOG/sample-device.txt" ]]; then
        echo "sampled output: device = host ($(wc -c <"$LOG/sample-device.txt") bytes)"
    else
        echo "sampled output: device and host differ (or are empty)"
        rc=1
    fi
done

if [[ -z "${SKIP_BENCH:-}" ]]; then
    [[ -x "$R/bench_attn_base" ]] && { echo "== bench_attn (baseline)"; timeout 60 "$R/bench_attn_base" 2>&1 | tee "$LOG/bench_base.log" | tail -n 12; }
    echo "== bench_attn"
    timeout 90 "$R/bench_attn" 2>&1 | tee "$LOG/bench_attn.log" | tail -n 30
    echo "== bench_attn_prefill"
    timeout 120 "$R/bench_attn_prefill" 2>&1 | tee "$LOG/bench_attn_prefill.log" | tail -n 20
fi
[[ -n "${OUT:-}" ]] && tar -czf "$OUT/smoke-logs.tar.gz" -C "$LOG" .
exit $rc
