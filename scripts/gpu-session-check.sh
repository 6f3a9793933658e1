#!/usr/bin/env bash
# Everything a session's device time should check, in one device call of
# at most 600 s (machines are scarce: session 9 got none for its second
# half, and every failed start cost budget): the smoke check's tests and
# greedy-text comparisons, then the Llama-2-7B shape's decode under the
# opt-in switches against the default, then a per-kernel profile of the
# decode step (and, with TORCH=1, the dense fp16 7B shape against plain
# PyTorch); between them, the prefill GEMM benchmark and the decode
# linears' plan sweep. Each phase has its own time limit, and its output goes to
# $OUT as it finishes, so a call cut short still returns what ran.
#
#   BIN=.device/sN PART=0 bash scripts/gpu-session-check.sh   (essentials, about 5 min)
#   BIN=.device/sN PART=1 bash scripts/gpu-session-check.sh   (checks, kernel benches)
#   BIN=.device/sN PART=2 bash scripts/gpu-session-check.sh   (7B engine, profile)
#   BIN=.device/sN PART=3 bash scripts/gpu-session-check.sh   (7B decode batches of 32, 48)
#   BIN=.device/sN PART=n bash scripts/gpu-session-check.sh   (deferred norm: tests, text, 7B, profile)
#
# BIN holds the binaries packed by `scripts/gpu-smoke-check.sh --collect`
# (bench_attn included: the 7B bench reads the copy bandwidth from it).
# ENVS overrides the settings compared on the 7B shape (see
# gpu-7b-bench.sh); BASELINE (an xz-compressed lmq of another commit)
# adds that binary to the comparison (then give fewer ENVS: each setting
# runs twice per binary, about 22 s a run, within the phase's 230 s).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"

BIN=${BIN:?BIN must name the folder of packed binaries}
LOG=${OUT:-/tmp/gpu-session-check}
mkdir -p "$LOG"
here=$(dirname "$0")

phase() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOG/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start))s"
    return 0
}

date -u
# PART=1: the checks and the kernel benchmarks (smoke, prefill GEMM, the
# decode linears' sweep); PART=2: the 7B engine under the switches, the
# per-kernel profile and (TORCH=1) PyTorch. Unset: both, which may not fit
# one call's 600 s.
PART=${PART:-all}
if [[ "$PART" == 0 ]]; then
    # The essentials when device time is short: the new kernels' tests and
    # timings and the decode linears' parity (every W4A16 launch changed).
    gpu_env
    unpack "$BIN" /tmp/lmq-smoke-bin
    B=/tmp/lmq-smoke-bin
    # The wgmma GEMM in both variants (one or two wgmmas in flight), its
    # test and its timing at 2048 and 4096 rows.
    for depth in 1 2; do
        phase "w4-gemm-d$depth" 60 env LMQ_W4_WGMMA_DEPTH=$depth "$B/w4_gemm" --nocapture
        grep -E "wgmma m|cases on|refused|test result|panicked" "$LOG/w4-gemm-d$depth.txt"
        for rows in 2048 4096; do
            phase "prefill-$rows-d$depth" 60 env LMQ_W4_WGMMA_DEPTH=$depth LMQ_BENCH_PREFILL_M=$rows "$B/bench_prefill"
            grep -E "^\|" "$LOG/prefill-$rows-d$depth.txt" | tail -n 3
        done
    done
    phase parity 60 "$B/parity" --nocapture
    grep -E "test result|panicked|prefetch" "$LOG/parity.txt"
    phase pdl 40 "$B/pdl" --nocapture
    grep -E "test result|panicked" "$LOG/pdl.txt"
    phase attn-prefill-pipe-test 60 "$B/attn_prefill" --nocapture
    grep -E "test result|panicked" "$LOG/attn-prefill-pipe-test.txt"
    phase backend-wgmma 60 env LMQ_W4_WGMMA=1 "$B/cuda_backend" linears_match_cpu --test-threads=1 --nocapture
    grep -E "test result|panicked|256->512" "$LOG/backend-wgmma.txt"
    phase w4-stacked 90 env LMQ_BENCH_M=1 "$B/bench_w4"
    grep -E "^copy|^\|" "$LOG/w4-stacked.txt" | tail -n 14
    exit 0
fi
if [[ "$PART" == n ]]; then
    # The deferred norm (LMQ_DEFERRED_NORM=1): its kernel and backend
    # tests, greedy text (graphs on = off with it; against the default,
    # reported: the rounding moves), the 7B decode against the default,
    # and its decode-step profile.
    gpu_env
    unpack "$BIN" /tmp/lmq-smoke-bin
    B=/tmp/lmq-smoke-bin
    phase deferred-norm-kernels 60 "$B/deferred_norm" --nocapture
    grep -E "test result|panicked|M (1|16), PDL true" "$LOG/deferred-norm-kernels.txt"
    phase deferred-norm-backend 90 "$B/cuda_deferred_norm" --nocapture
    grep -E "test result|panicked|(1|16) rows" "$LOG/deferred-norm-backend.txt"
    "$B/lmq" synth-model --preset smollm2-135m --weights awq --out /tmp/lmq-s135 --quiet --force
    gen() {
        env "$@" timeout 40 "$B/lmq" generate --model /tmp/lmq-s135 --device cuda \
            --prompt "the quick brown fox" --max-tokens 200 --ignore-eos 2>>"$LOG/generate.err"
    }
    gen LMQ_DEFAULT=1 >"$LOG/text-default.txt"
    gen LMQ_DEFERRED_NORM=1 >"$LOG/text-deferred.txt"
    gen LMQ_DEFERRED_NORM=1 LMQ_CUDA_GRAPHS=0 >"$LOG/text-deferred-eager.txt"
    if cmp -s "$LOG/text-deferred.txt" "$LOG/text-deferred-eager.txt" && [[ -s "$LOG/text-deferred.txt" ]]; then
        echo "deferred norm: graph = eager ($(wc -c <"$LOG/text-deferred.txt") bytes)"
    else
        echo "deferred norm: graph and eager outputs differ (or are empty)"
    fi
    if cmp -s "$LOG/text-default.txt" "$LOG/text-deferred.txt"; then
        echo "deferred norm: text = default"
    else
        echo "deferred norm: text differs from the default after $(cmp "$LOG/text-default.txt" "$LOG/text-deferred.txt" | sed -n 's/.*byte \([0-9]*\).*/\1/p') bytes"
    fi
    phase bench-7b 280 env BIN="$BIN" PRESETS=llama2-7b WEIGHTS=awq INPUT_LEN="${INPUT_LEN:-2048}" \
        ENVS="${ENVS:-LMQ_DEFAULT=1 LMQ_DEFERRED_NORM=1}" bash "$here/gpu-7b-bench.sh"
    grep -E "^\||programmatic|turned off" "$LOG/bench-7b.txt"
    phase profile 120 env BIN="$BIN" PRESET=llama2-7b LMQ_DEFERRED_NORM=1 bash "$here/gpu-kernel-profile.sh"
    tail -n 14 "$LOG/profile.txt"
    exit 0
fi
if [[ "$PART" == 1 || "$PART" == all ]]; then
    # First the newest kernel's checks and timing (the wgmma prefill GEMM),
    # so that a call cut short still returns them.
    gpu_env
    unpack "$BIN" /tmp/lmq-smoke-bin
    if [[ -x /tmp/lmq-smoke-bin/w4_gemm ]]; then
        phase w4-gemm 60 /tmp/lmq-smoke-bin/w4_gemm --nocapture
        grep -E "wgmma m|cases on|refused|test result|panicked" "$LOG/w4-gemm.txt"
    fi
    phase prefill 60 /tmp/lmq-smoke-bin/bench_prefill
    grep -E "^\|" "$LOG/prefill.txt"
    phase smoke 300 env BIN="$BIN" SKIP_BENCH=1 bash "$here/gpu-smoke-check.sh"
    grep -v "^attention \|max err" "$LOG/smoke.txt" | tail -n 60

    # The decode linears' launch-plan sweep and in-kernel L2 prefetch,
    # from the binaries the smoke phase unpacked.
    phase w4-sweep 110 env LMQ_BENCH_M=1 LMQ_BENCH_SWEEP=1 /tmp/lmq-smoke-bin/bench_w4
    grep -E "^copy|^\|" "$LOG/w4-sweep.txt" | tail -n 34
fi
[[ "$PART" == 1 ]] && exit 0
if [[ "$PART" == 3 ]]; then
    # Prefill attention with the integer tiles pipelined or not (the same
    # binary; LMQ_PREFILL_INT_PIPE is read once per process).
    gpu_env
    unpack "$BIN" /tmp/lmq-smoke-bin
    phase attn-prefill 90 env LMQ_PREFILL_INT_PIPE=0 /tmp/lmq-smoke-bin/bench_attn_prefill
    phase attn-prefill-pipe 90 /tmp/lmq-smoke-bin/bench_attn_prefill
    grep -E "^\|" "$LOG/attn-prefill.txt" "$LOG/attn-prefill-pipe.txt"
    # Decode batches of 32 and 48 on the 7B shape, with and without the
    # decode kernel on slices of rows.
    phase batch-7b 300 env BIN="$BIN" bash "$here/gpu-batch-bench.sh"
    grep -E "^batch|failed|error" "$LOG/batch-7b.txt"
    exit 0
fi

# LMQ_DEFAULT=1 sets nothing lmq reads: it names the default run.
ENVS=${ENVS:-"LMQ_DEFAULT=1 LMQ_L2_PREFETCH=0 LMQ_PDL=1,LMQ_PDL_SPLICE=chain"}
phase bench-7b 280 env BIN="$BIN" PRESETS=llama2-7b WEIGHTS=awq ENVS="$ENVS" \
    ${BASELINE:+BASELINE="$BASELINE"} bash "$here/gpu-7b-bench.sh"
grep -E "^\||programmatic|turned off" "$LOG/bench-7b.txt"

phase profile 120 env BIN="$BIN" PRESET=llama2-7b bash "$here/gpu-kernel-profile.sh"
tail -n 14 "$LOG/profile.txt"

# TORCH=1: the dense fp16 7B shape, lmq against the plain-PyTorch
# reference (scripts/torch-llama-bench.py), alternating. It needs torch
# there (the device image has it) and about 150 s more.
if [[ "${TORCH:-}" == 1 ]]; then
    phase torch-7b 150 env BIN="$BIN" PRESETS=llama2-7b WEIGHTS=fp16 TORCH=1 bash "$here/gpu-7b-bench.sh"
    grep -E "^\||graph_matches_eager" "$LOG/torch-7b.txt" | cut -c1-300
fi
