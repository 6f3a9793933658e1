#!/usr/bin/env bash
# Serving benchmark: requests/s and TTFT/TPOT/end-to-end percentiles of
# `lmq serve` under an `lmq bench`-like workload, directly and through
# `lmq proxy` in the same run, and the proxy's overhead on p50 TTFT.
#
# Usage: scripts/bench-serve.sh [MODEL_DIR]     (default: the SmolLM2 cache)
#
# `lmq bench` drives the engine in-process and cannot target an HTTP
# endpoint, so the client is tests/load_client.py (the official `openai`
# Python client, async, streaming; see its header for what it measures).
# One `lmq serve` node runs with one `lmq proxy` in front of it. Four
# phases, each against the same node:
#   1. direct:  NUM_PROMPTS requests at CONCURRENCY, random token-id prompts
#      of INPUT_LEN tokens, OUTPUT_LEN tokens each (ignore_eos), like
#      `lmq bench --input-len L --output-len L` (64 and 16 are its
#      defaults; fixed lengths rather than its ShareGPT-like ones keep a
#      phase near a minute on 2 CPU cores);
#   2. proxy:   the same requests through the proxy;
#   3. direct again, so that drift of a shared machine between phases
#      shows: the proxy only relays bytes, so a TPOT change between the
#      rows is the machine, not the proxy;
#   4. overhead: PAIRS pairs of one-token requests (one-token prompts), one
#      at a time, alternating direct and proxy (A, B, A, B, ...), so both
#      paths see the same machine state; the shortest engine work gives the
#      least noise. The proxy's p50 TTFT overhead is p50(proxy) -
#      p50(direct) of this phase, and the median of the per-pair
#      differences is given beside it; the bar (< 1 ms) counts as met only
#      if both are under it. Phases 1-3 are loaded, so their TTFTs are
#      dominated by batching and differ by more than the proxy adds.
#
# Settings (environment): LMQ_BIN (default: target/release/lmq, built if
# missing), NUM_PROMPTS=64, CONCURRENCY=16, INPUT_LEN=128, OUTPUT_LEN=32,
# PAIRS=300, KV_CACHE_BYTES=512M, OUT (a folder for the raw JSON; default a
# temporary one, printed). Needs python3 with the `openai` package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

NUM_PROMPTS=${NUM_PROMPTS:-64}
CONCURRENCY=${CONCURRENCY:-16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-32}
PAIRS=${PAIRS:-300}
KV_CACHE_BYTES=${KV_CACHE_BYTES:-512M}
OUT=${OUT:-$(mktemp -d -t lmq-bench-serve.XXXXXX)}
mkdir -p "$OUT"

python3 -c "import openai" 2>/dev/null || {
    echo "bench-serve: needs the openai Python package (python3 -m pip install openai)" >&2
    exit 1
}
if [ -z "${LMQ_BIN:-}" ]; then
    cargo build --release --quiet
    LMQ_BIN=$root/target/release/lmq
fi
MODEL=${1:-$(scripts/fetch-model.sh smollm2-135m)}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Waits for `lmq CMD: listening on http://HOST:PORT` in file $1; prints the URL.
ready_url() {
    for _ in $(seq 1 600); do
        if url=$(grep -o 'listening on http://[^ ]*' "$1" 2>/dev/null | head -1); then
            [ -n "$url" ] && { echo "${url#listening on }"; return 0; }
        fi
        sleep 0.2
    done
    echo "bench-serve: no ready line in $1" >&2
    cat "$1" "${1%.out}.err" >&2 || true
    return 1
}

"$LMQ_BIN" serve --model "$MODEL" --served-model-name bench --port 0 \
    --kv-cache-bytes "$KV_CACHE_BYTES" >"$OUT/serve.out" 2>"$OUT/serve.err" &
pids+=($!)
node=$(ready_url "$OUT/serve.out")
printf 'health_check_interval_s: 5\nnodes:\n  - url: %s\n' "$node" >"$OUT/proxy.yaml"
"$LMQ_BIN" proxy --config "$OUT/proxy.yaml" --port 0 >"$OUT/proxy.out" 2>"$OUT/proxy.err" &
pids+=($!)
proxy=$(ready_url "$OUT/proxy.out")

client() {
    python3 "$root/tests/load_client.py" --model bench --check "$@"
}
load=(--requests "$NUM_PROMPTS" --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN"
    --max-tokens "$OUTPUT_LEN" --warmup 2)
echo "bench-serve: node $node, proxy $proxy, raw results in $OUT" >&2
echo "bench-serve: phase 1/4, direct" >&2
client --target "$node/v1" "${load[@]}" >"$OUT/direct.json"
echo "bench-serve: phase 2/4, through the proxy" >&2
client --target "$proxy/v1" "${load[@]}" >"$OUT/proxy.json"
echo "bench-serve: phase 3/4, direct again" >&2
client --target "$node/v1" "${load[@]}" >"$OUT/direct2.json"
echo "bench-serve: phase 4/4, $PAIRS alternating pairs of one-token requests" >&2
client --target "$node/v1" --target "$proxy/v1" --requests $((2 * PAIRS)) --concurrency 1 \
    --input-len 1 --max-tokens 1 --warmup 5 >"$OUT/overhead.json"

python3 - "$OUT" "$node/v1" "$proxy/v1" <<'EOF'
import json, sys
out, node, proxy = sys.argv[1:4]
load = lambda name: json.load(open(f"{out}/{name}.json"))
direct, via, again, pair = load("direct"), load("proxy"), load("direct2"), load("overhead")
print(f"workload: {direct['requests']} requests, concurrency {direct['concurrency']}, "
      f"output {direct['max_tokens']} tokens each (ignore_eos)")
print("| path | req/s | output tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | e2e p50 / p90 / p99 ms |")
print("|---|---|---|---|---|---|")
for label, run, target in (("direct", direct, node), ("through proxy", via, proxy),
                           ("direct again", again, node)):
    s = run["targets"][target]
    row = lambda k: " / ".join(f"{s[k][p]:.1f}" for p in ("p50", "p90", "p99"))
    print(f"| {label} | {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
          f"{row('ttft_ms')} | {row('tpot_ms')} | {row('e2e_ms')} |")
d, p = pair["targets"][node]["ttft_ms"], pair["targets"][proxy]["ttft_ms"]
diff = pair["paired_ttft_diff_ms"]
overhead = p["p50"] - d["p50"]
print(f"overhead phase ({diff['pairs']} pairs, one-token requests, one at a time): "
      f"TTFT p50 direct {d['p50']:.3f} ms, through proxy {p['p50']:.3f} ms")
print(f"proxy p50 TTFT overhead: {overhead:.3f} ms "
      f"(median of paired differences {diff['p50']:.3f} ms); bar < 1 ms: "
      f"{'met' if max(overhead, diff['p50']) < 1.0 else 'NOT met'}")
EOF
