#!/usr/bin/env bash
# The main job on the default model, end to end:
#   1. build lmq and fetch SmolLM2-135M-Instruct (cached after the first run);
#   2. quantize it with AWQ (4-bit weights, g64) and int8 KV calibration
#      (cached; about 10-15 minutes on 2 cores the first time);
#   3. serve the fp16 and the AWQ model behind one address, routed by name;
#   4. send one chat request to each and print the answers with their tok/s;
#   5. leave the server running and print where it listens and how to stop it.
#
#   scripts/demo.sh            # port 23333
#   PORT=8080 scripts/demo.sh
#
# LMQ_DEMO_METHOD=rtn makes step 2 take seconds instead (round-to-nearest).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
port=${PORT:-23333}
method=${LMQ_DEMO_METHOD:-awq}
cache=${LMQ_CACHE:-$HOME/.cache/lmq}

cargo build --release
lmq="$root/target/release/lmq"
fp16=$(scripts/fetch-model.sh smollm2-135m)
awq="$cache/models/smollm2-135m-$method-kv8"
if [ ! -f "$awq/config.json" ]; then
  echo "quantizing with $method and int8 KV into $awq (once)..." >&2
  "$lmq" quantize --model "$fp16" --out "$awq" --method "$method" --kv int8
fi

state="$cache/demo"
mkdir -p "$state"
cat > "$state/models.yaml" <<EOF
models:
  - model: $fp16
    name: smollm2-135m
  - model: $awq
    name: smollm2-135m-awq
EOF
log="$state/serve.log"
"$lmq" serve --config "$state/models.yaml" --port "$port" --kv-cache-bytes 256M > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  grep -q "listening on" "$log" 2>/dev/null && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: lmq serve exited; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.2
done
grep -q "listening on" "$log" || { echo "error: lmq serve did not start; see $log" >&2; kill "$pid"; exit 1; }

python3 - "$port" <<'PY'
import json, sys, time, urllib.request

port = sys.argv[1]
question = "What is the capital of France? Answer in one sentence."
for model in ["smollm2-135m", "smollm2-135m-awq"]:
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body, headers={"Content-Type": "application/json"})
    t0 = time.time()
    first = None
    text, usage = "", None
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.time()
                text += piece
    end = time.time()
    tokens = usage["completion_tokens"] if usage else 0
    decode = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
    print(f"[{model}] {text.strip()}")
    print(f"  {usage['prompt_tokens'] if usage else '?'} prompt tokens, {tokens} generated; "
          f"first token after {(first or end) - t0:.2f} s, then {decode:.1f} tok/s\n")
PY

echo "lmq serve is listening on http://127.0.0.1:$port (models: smollm2-135m, smollm2-135m-awq); log: $log"
echo "stop it with: kill $pid"
