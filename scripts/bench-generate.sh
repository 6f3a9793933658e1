#!/usr/bin/env bash
# Prompt and generation throughput of `lmq generate` (batch 1, CPU), the
# median of several runs. Prints one line per configuration.
#
#   scripts/bench-generate.sh MODEL_DIR [RUNS] [extra lmq generate flags]
set -euo pipefail
model=${1:?model folder}
runs=${2:-5}
shift $(( $# >= 2 ? 2 : 1 ))
root=$(cd "$(dirname "$0")/.." && pwd)
lmq="$root/target/release/lmq"
# A fixed ~500-token prompt from the evaluation text, and 128 new tokens.
prompt=$(head -c 2200 "$root/calib_data/eval.txt")
pp=(); tg=()
for _ in $(seq "$runs"); do
  line=$("$lmq" generate --model "$model" --prompt "$prompt" --max-tokens 128 --ignore-eos "$@" 2>&1 >/dev/null | tail -1)
  pp+=("$(echo "$line" | sed -E 's/.*prompt: ([0-9]+) tokens in [0-9.]+s \(([0-9.]+) tok\/s\).*/\2/')")
  tg+=("$(echo "$line" | sed -E 's/.*generation: [0-9]+ tokens in [0-9.]+s \(([0-9.]+) tok\/s\).*/\1/')")
  ptoks=$(echo "$line" | sed -E 's/.*prompt: ([0-9]+) tokens.*/\1/')
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "model=$model prompt_tokens=$ptoks runs=$runs prefill_tok_s=$(median "${pp[@]}") decode_tok_s=$(median "${tg[@]}")"
