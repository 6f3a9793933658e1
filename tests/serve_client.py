#!/usr/bin/env python3
"""Drives a running `lmq serve`, or an `lmq proxy` in front of such nodes,
with the official `openai` Python client.

Usage: serve_client.py BASE_URL API_KEY MODEL [--proxy]
Run by tests/serve.rs (official_openai_client) against a node, and by
tests/proxy.rs (load_through_the_proxy_with_the_openai_client) against a
proxy whose nodes serve only MODEL and need API_KEY. Exits non-zero with
the failed check on the first failure, and prints "all checks passed" at
the end.

With --proxy the wrong-key check goes through a chat request (the proxy
forwards the client's key to the node, which checks it; the proxy's own
/v1/models has no key).
"""

import sys

import openai


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def main():
    base_url, key, model = sys.argv[1:4]
    through_proxy = "--proxy" in sys.argv[4:]
    # No retries: a 429 or 5xx must surface, not be retried away.
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)

    models = [m.id for m in client.models.list()]
    check(models == [model], f"models.list() == [{model}] (got {models})")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content
    check("Paris" in text, f"chat answers Paris (got {text!r})")
    check(chat.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")
    u = chat.usage
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0, f"chat usage {u}")

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    check("".join(pieces) == text, "streamed chat equals the whole response")
    check(reasons == [chat.choices[0].finish_reason], f"one finish_reason in the stream (got {reasons})")
    check(usage is not None and usage.completion_tokens == u.completion_tokens, f"stream usage {usage}")

    prompt = "The capital of France is"
    comp = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    full = comp.choices[0].text
    check(comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 10, "completion of 10 tokens")
    stop = full.strip().split()[1] if len(full.split()) > 1 else full[2:4]
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    check(cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop",
          f"stop={stop!r} cuts {full!r} to {cut.choices[0].text!r}")

    streamed = "".join(
        c.choices[0].text for c in
        client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    check(streamed == full, "streamed completion equals the whole one")

    def sample(seed):
        return client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=seed
        ).choices[0].text
    check(sample(7) == sample(7), "the same seed gives the same text")

    lp = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    check(len(lp.choices[0].logprobs.token_logprobs) == 3, "completion logprobs per token")
    clp = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=2)
    check(all(len(t.top_logprobs) == 2 for t in clp.choices[0].logprobs.content), "chat top_logprobs")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(model in str(e), "unknown model -> NotFoundError listing the served model")
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=2)
        check(False, "empty messages raises")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "messages", f"empty messages -> BadRequestError (param {e.body.get('param')})")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=5)
        check(False, "temperature 5 raises")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", "temperature 5 -> BadRequestError")
    wrong = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    if not through_proxy:
        try:
            wrong.models.list()
            check(False, "a wrong key raises")
        except openai.AuthenticationError:
            check(True, "wrong key -> AuthenticationError on models.list()")
    try:
        wrong.chat.completions.create(model=model, messages=messages, max_tokens=2)
        check(False, "a wrong key raises on chat")
    except openai.AuthenticationError:
        check(True, "wrong key -> AuthenticationError on chat")

    print("all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
