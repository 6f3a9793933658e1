#!/usr/bin/env bash
# GPU check for the lmq-kernels crate, run on a CUDA machine from the repo
# root. The machine needs the NVIDIA driver and NVRTC (CUDA 13), no Rust:
# the binaries are built elsewhere and carried in $BIN.
#
# Build them (on a machine with cargo):
#   cargo test --release -p lmq-kernels --no-run
#   cargo build --release -p lmq-kernels --examples
#   scripts/gpu-check.sh --collect     # copies the executables into .device/bin
# then, on the GPU machine:
#   bash scripts/gpu-check.sh
#
# It prints the GPU, runs the parity tests and the W4A16 benchmark, and ends
# with a short table. Logs go to $OUT (or /tmp/gpu-check). With PROFILE=1 it
# also runs Nsight Compute on one W4A16 launch (q/k/v/o shape, M = 1).
set -uo pipefail

BIN=${BIN:-.device/bin}

if [[ "${1:-}" == "--collect" ]]; then
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$BIN"
    newest() { ls -t $1 2>/dev/null | grep -v '\.d$' | head -n1; }
    # Stripped copies: they travel to the GPU machine.
    strip -o "$BIN/parity" "$(newest "$target/release/deps/parity-*")"
    strip -o "$BIN/unit" "$(newest "$target/release/deps/lmq_kernels-*")"
    strip -o "$BIN/bench_w4" "$target/release/examples/bench_w4"
    ls -l "$BIN"
    exit 0
fi

LOG=${OUT:-/tmp/gpu-check}
mkdir -p "$LOG"

# NVRTC and headers: the CUDA toolkit, else pip's nvidia wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib; do
    [[ -d "$d" ]] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
export LMQ_KERNEL_CACHE=${LMQ_KERNEL_CACHE:-$LOG/kernel-cache}

echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
command -v nvcc >/dev/null && nvcc --version | tail -n2

status() { if [[ $1 -eq 0 ]]; then echo pass; else echo "FAIL ($1)"; fi; }

"$BIN/unit" --test-threads=2 >"$LOG/unit.log" 2>&1
unit_rc=$?
"$BIN/parity" --test-threads=1 --nocapture >"$LOG/parity.log" 2>&1
parity_rc=$?
cat "$LOG/parity.log"

# Registers and spills of the compiled kernels (from the cubin cache).
if command -v cuobjdump >/dev/null; then
    for f in "$LMQ_KERNEL_CACHE"/*.cubin; do
        [[ -f "$f" ]] && cuobjdump -res-usage "$f" 2>/dev/null | grep -E "Function|REG" | sed 's/^/  /'
    done >"$LOG/resources.txt"
    cat "$LOG/resources.txt"
fi

"$BIN/bench_w4" >"$LOG/bench.log" 2>&1
bench_rc=$?

if [[ "${PROFILE:-0}" == 1 ]] && command -v ncu >/dev/null; then
    LMQ_BENCH_PROBE=0 LMQ_BENCH_SHAPE=q/k LMQ_BENCH_M=1 ncu --clock-control none -k regex:w4a16 \
        --launch-skip 70 --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats "$BIN/bench_w4" >"$LOG/ncu.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Issue Slots Busy|Issued Instructions|Registers Per|Achieved Active" "$LOG/ncu.txt"
fi

echo
echo "=== lmq-kernels GPU check ==="
echo "| step | result |"
echo "|---|---|"
echo "| unit tests | $(status $unit_rc) |"
echo "| parity tests | $(status $parity_rc) ($(grep -c ' ... ok' "$LOG/parity.log") ok) |"
echo "| benchmark | $(status $bench_rc) |"
echo
cat "$LOG/bench.log"
[[ $unit_rc -eq 0 && $parity_rc -eq 0 && $bench_rc -eq 0 ]]
