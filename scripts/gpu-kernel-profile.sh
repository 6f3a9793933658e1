#!/usr/bin/env bash
# Where a decode step's GPU time goes, kernel by kernel: Nsight Compute
# (ncu) times every kernel of a few eager decode steps of a synthesized
# model, one kernel at a time (so launch gaps are not in it), with the
# clocks and caches left alone (METHOD.md), and the sums per kernel name
# are printed as a table. Run on the GPU machine from the repo root, with
# the lmq binary packed in $BIN (gpu-smoke-check.sh --collect packs it).
#
#   BIN=.device/s9 PRESET=llama2-7b bash scripts/gpu-kernel-profile.sh
#
# SKIP launches are skipped first (the prompt and the first steps), then
# COUNT are timed; STEPS says how many decode steps COUNT covers, for the
# per-step column (count the launches of one step in the CSV to set it).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"

BIN=${BIN:-.device/smoke}
PRESET=${PRESET:-llama2-7b}
SKIP=${SKIP:-3000}
COUNT=${COUNT:-1200}
LOG=${OUT:-/tmp/gpu-kernel-profile}
mkdir -p "$LOG"
gpu_env
R=/tmp/lmq-profile-bin
unpack "$BIN" "$R"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
[[ -x "$NCU" ]] || { echo "no ncu on this machine" >&2; exit 1; }
M=/tmp/lmq-profile-$PRESET
[[ -f "$M/config.json" ]] || "$R/lmq" synth-model --preset "$PRESET" --weights awq --out "$M" --quiet --force
# Eager launches, so that ncu sees each kernel by name (graph replays
# would be profiled node by node too, but eager is what ncu handles best).
LMQ_CUDA_GRAPHS=0 timeout 500 "$NCU" --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --launch-skip "$SKIP" --launch-count "$COUNT" --csv \
    "$R/lmq" generate --model "$M" --device cuda --prompt "the quick brown fox" \
    --max-tokens 64 --ignore-eos >"$LOG/ncu.csv" 2>"$LOG/ncu.err"
echo "ncu exit $?; $(grep -c gpu__time_duration "$LOG/ncu.csv") kernel rows"
python3 - "$LOG/ncu.csv" <<'EOF'
import csv, sys, collections
rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "")
    us = v / 1000 if unit in ("nsecond", "ns") else v * 1000 if unit in ("msecond", "ms") else v
    rows.append((r["Kernel Name"].split("(")[0], us))
total = sum(us for _, us in rows)
by = collections.defaultdict(lambda: [0, 0.0])
for name, us in rows:
    by[name][0] += 1
    by[name][1] += us
print(f"{len(rows)} kernels, {total:.0f} us in all")
print("| kernel | launches | us in all | share | mean us |")
print("|---|---|---|---|---|")
for name, (n, us) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"| {name[:60]} | {n} | {us:.0f} | {100 * us / total:.1f}% | {us / n:.2f} |")
EOF
