#!/usr/bin/env bash
# Where one eager decode step's GPU time goes, per kernel, on a
# random-weight model: Nsight Compute times `LAUNCHES` consecutive kernels
# (about one decode step) of `lmq generate` with CUDA graphs off, after
# skipping the prefill and the first decode steps, and the totals per
# kernel name are printed, largest first. Runs on the GPU machine from the
# repo root with the binaries of `scripts/gpu-smoke-check.sh --collect` in
# $BIN. PRESET (default llama2-7b), SKIP (default 2400), LAUNCHES (420).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh"
BIN=${BIN:-.device/smoke}
gpu_env
R=/tmp/lmq-profile-bin
unpack "$BIN" "$R"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [[ -z "$NCU" ]]; then
    echo "no ncu on this machine"
    exit 1
fi
PRESET=${PRESET:-llama2-7b}
M=/tmp/lmq-profile-$PRESET
"$R/lmq" synth-model --preset "$PRESET" --weights awq --out "$M" --quiet --force
LMQ_CUDA_GRAPHS=0 timeout 300 "$NCU" --metrics gpu__time_duration.sum --csv \
    --launch-skip "${SKIP:-2400}" --launch-count "${LAUNCHES:-420}" \
    "$R/lmq" generate --model "$M" --device cuda --prompt "the quick brown fox" \
    --max-tokens 16 --ignore-eos >/tmp/ncu.csv 2>/tmp/ncu.err
tail -n 3 /tmp/ncu.err
python3 - /tmp/ncu.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
unit = head.index("Metric Unit")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[1:]:
    if r[m] != "gpu__time_duration.sum":
        continue
    t = float(r[v].replace(",", ""))
    t *= {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(r[unit], 1.0)  # µs
    name = r[k].split("(")[0]
    tot[name] += t
    cnt[name] += 1
s = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {s:.0f} µs of GPU time")
for name, t in tot.most_common():
    print(f"{t:9.1f} µs {100*t/s:5.1f}%  {cnt[name]:4d} × {t/cnt[name]:7.2f} µs  {name}")
PY
