#!/usr/bin/env python3
"""Concurrent streaming load on OpenAI-compatible endpoints (`lmq serve`,
`lmq proxy`), driven by the official `openai` Python client (async), with
per-request timing.

Used by tests/proxy.rs (the load and failover tests) and by
scripts/bench-serve.sh (requests/s and TTFT/TPOT/e2e percentiles, direct
and through the proxy).

Workload. Every request streams (`stream: true` with
`stream_options.include_usage`), sets `ignore_eos` and `temperature: 0`,
and so generates exactly --max-tokens tokens. Prompts are either short
texts (`Count to I:`; with --api chat or mix, chat messages too) or, with
--input-len, seeded random token ids of that length sent as a completions
prompt, like `lmq bench`'s fixed-length workload. At most --concurrency
requests are in flight; each task takes the next request when one ends.
With several --target, request I goes to target I mod (number of targets),
so with --concurrency 1 two targets strictly alternate (A, B, A, B, ...),
and slow drift of a shared machine affects both alike.

Measures, per request: TTFT (request sent to the first chunk carrying a
choice), end-to-end latency (to the end of the stream), TPOT
((e2e - TTFT) / (tokens - 1)). Per target: requests/s and output tokens/s
over the run's wall time, and p50/p90/p99 of each (linear interpolation,
as numpy's default). With two targets and --concurrency 1, also the median
of the paired TTFT differences (second minus first target), the most
robust estimate of what the second path adds.

Output: one JSON line on stdout (the summary), a table on stderr, and with
--results FILE one JSON record per request. With --check the exit status
is 1 unless every request succeeded with exactly --max-tokens tokens and
finish_reason "length".
"""

import argparse
import asyncio
import json
import random
import sys
import time

import openai


def percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def stats_ms(values):
    return {f"p{q}": None if percentile(values, q) is None else round(percentile(values, q) * 1000, 3)
            for q in (50, 90, 99)} | {"mean": round(sum(values) / len(values) * 1000, 3) if values else None}


async def one(client, args, index, prompt_ids):
    """Runs request `index`; returns its record."""
    api = args.api if args.api != "mix" else ("chat" if index % 2 else "completions")
    common = dict(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    record = {"index": index, "api": api, "ok": False, "start_unix": time.time()}
    start = time.perf_counter()
    ttft = None
    tokens = None
    reasons = []
    try:
        if api == "chat":
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": f"Count to {index}."}], **common)
        else:
            prompt = prompt_ids if prompt_ids is not None else f"Count to {index}:"
            stream = await client.completions.create(prompt=prompt, **common)
        async for chunk in stream:
            if chunk.choices:
                if ttft is None:
                    ttft = time.perf_counter() - start
                for c in chunk.choices:
                    if c.finish_reason:
                        reasons.append(c.finish_reason)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        e2e = time.perf_counter() - start
        record.update(ttft=ttft, e2e=e2e, tokens=tokens, finish_reasons=reasons)
        if tokens is None or ttft is None:
            record["error"] = "the stream ended without a choice or usage"
        elif args.check and (tokens != args.max_tokens or reasons != ["length"]):
            record["error"] = f"{tokens} tokens, finish_reason {reasons}; expected {args.max_tokens}, length"
        else:
            record["ok"] = True
            if tokens > 1:
                record["tpot"] = (e2e - ttft) / (tokens - 1)
    except Exception as e:  # every failure is recorded, none stops the run
        record["error"] = f"{type(e).__name__}: {e}"
    record["end_unix"] = time.time()
    return record


async def run(args):
    clients = [openai.AsyncOpenAI(base_url=t, api_key=args.api_key, max_retries=0, timeout=args.timeout)
               for t in args.target]
    rng = random.Random(args.seed)
    prompts = None
    if args.input_len:
        prompts = [[rng.randrange(100, 49000) for _ in range(args.input_len)]
                   for _ in range(args.requests)]

    async def warm():
        for k, client in enumerate(clients):
            for w in range(args.warmup):
                await one(client, args, w * len(clients) + k, prompts[0] if prompts else None)

    await warm()
    queue = list(range(args.requests))
    queue.reverse()
    records = []

    async def worker():
        while queue:
            i = queue.pop()
            target = i % len(clients)
            r = await one(clients[target], args, i, prompts[i] if prompts else None)
            r["target"] = args.target[target]
            records.append(r)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.requests))))
    wall = time.perf_counter() - started
    for c in clients:
        await c.close()
    return records, wall


def summarize(args, records, wall):
    out = {"requests": len(records), "wall_s": round(wall, 3), "max_tokens": args.max_tokens,
           "concurrency": args.concurrency, "targets": {}}
    for t in args.target:
        mine = [r for r in records if r["target"] == t]
        ok = [r for r in mine if r["ok"]]
        out["targets"][t] = {
            "requests": len(mine),
            "ok": len(ok),
            "failed": len(mine) - len(ok),
            "requests_per_s": round(len(ok) / wall, 3),
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 3),
            "ttft_ms": stats_ms([r["ttft"] for r in ok]),
            "tpot_ms": stats_ms([r["tpot"] for r in ok if "tpot" in r]),
            "e2e_ms": stats_ms([r["e2e"] for r in ok]),
        }
    if len(args.target) == 2 and args.concurrency == 1:
        by_index = {r["index"]: r for r in records}
        diffs = [by_index[i + 1]["ttft"] - by_index[i]["ttft"]
                 for i in range(0, len(records) - 1, 2)
                 if by_index[i]["ok"] and by_index[i + 1]["ok"]]
        out["paired_ttft_diff_ms"] = stats_ms(diffs) | {"pairs": len(diffs)}
    return out


def table(summary):
    lines = []
    for t, s in summary["targets"].items():
        lines.append(f"{t}: {s['ok']}/{s['requests']} ok, {s['requests_per_s']} req/s, "
                     f"{s['output_tokens_per_s']} output tok/s")
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            v = s[name]
            lines.append(f"  {name:8} mean {v['mean']}  p50 {v['p50']}  p90 {v['p90']}  p99 {v['p99']}")
    if "paired_ttft_diff_ms" in summary:
        d = summary["paired_ttft_diff_ms"]
        lines.append(f"paired TTFT difference (second - first target), ms: p50 {d['p50']} "
                     f"mean {d['mean']} over {d['pairs']} pairs")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=None, help="default: all requests at once")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--input-len", type=int, default=None, help="random token-id prompts of this length")
    p.add_argument("--api", choices=["completions", "chat", "mix"], default="completions")
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests per target first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--results", help="write one JSON record per request here")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.concurrency is None:
        args.concurrency = args.requests
    if args.input_len and args.api != "completions":
        p.error("--input-len sends token ids, which only --api completions takes")

    records, wall = asyncio.run(run(args))
    summary = summarize(args, records, wall)
    if args.results:
        with open(args.results, "w") as f:
            for r in sorted(records, key=lambda r: r["index"]):
                f.write(json.dumps(r) + "\n")
    print(table(summary), file=sys.stderr)
    print(json.dumps(summary))
    failed = [r for r in records if not r["ok"]]
    if args.check and failed:
        for r in failed[:5]:
            print(f"FAILED request {r['index']}: {r.get('error')}", file=sys.stderr)
        print(f"{len(failed)} of {len(records)} requests failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
