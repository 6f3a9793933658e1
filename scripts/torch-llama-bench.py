#!/usr/bin/env python3
"""Plain-PyTorch Llama decoder: the dense fp16 reference for `lmq bench --latency`.

Loads a Hugging Face-style Llama folder (for example one written by
`lmq synth-model --weights fp16`) with nothing but torch, so that it runs on
a GPU machine where only torch is installed, then measures batch-1 prefill
and greedy decode with the same meaning as `lmq bench --latency`:

  prefill tok/s = input_len / (time to the first generated token)
  decode tok/s  = (output_len - 1) / (time from the first to the last token)

each the median of --iterations runs after one warm-up. Prints one JSON line.

  python3 scripts/torch-llama-bench.py --model DIR [--device cuda|cpu]
      [--dtype fp16|fp32] [--input-len 128] [--output-len 128]
      [--iterations 3] [--no-graph] [--compile]

`--check-against-transformers` (CPU, needs `transformers`) instead runs a
short greedy generation in fp32 here and with Hugging Face's
LlamaForCausalLM on the same folder, and fails unless the tokens are the
same and the first step's logits agree.
"""

import argparse
import glob
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

# safetensors dtype names and the torch dtypes they are read as.
SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}


class SafetensorsFolder:
    """Tensors of every safetensors shard of a folder, read on demand.

    The `safetensors` package may be missing on the GPU machine, so the
    format is parsed here: an 8-byte little-endian header length, a JSON
    header giving each tensor's dtype, shape and byte range relative to the
    end of the header, then the raw little-endian bytes. Each file is
    memory-mapped once (private mapping, so nothing is written back), and a
    tensor is a view of its bytes until the caller copies it.
    """

    def __init__(self, folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(folder, name) for name in files]
        else:
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise SystemExit(f"no .safetensors files in {folder}")
        self.entries = {}
        for path in files:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            size = os.path.getsize(path)
            storage = torch.UntypedStorage.from_file(path, False, size)
            data = torch.empty(0, dtype=torch.uint8).set_(storage)
            base = 8 + header_len
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                self.entries[name] = (data, base, meta)

    def __contains__(self, name):
        return name in self.entries

    def get(self, name, device, dtype):
        """A fresh copy of tensor `name` on `device` in `dtype`."""
        if name not in self.entries:
            raise SystemExit(f"tensor {name} is missing from the checkpoint")
        data, base, meta = self.entries[name]
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise SystemExit(f"{name}: dtype {meta['dtype']} is not supported (F16, BF16, F32)")
        src_dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        raw = data[base + start : base + end]
        # Viewing bytes as a wider dtype needs an offset that is a multiple
        # of the element size; the format does not promise that, so an
        # unaligned tensor is first copied into a fresh (aligned) buffer.
        if (base + start) % src_dtype.itemsize:
            raw = raw.clone()
        t = raw.view(src_dtype).reshape(meta["shape"])
        # copy=True so that no weight keeps the file mapping alive and no
        # timed step pays for page faults on it.
        return t.to(device=device, dtype=dtype, copy=True)


def rope_inv_freq(head_dim, theta, scaling):
    """Inverse rotary frequencies and the position scale, as HF Llama and lmq build them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    position_scale = 1.0
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        position_scale = 1.0 / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(
            wavelen > old_ctx / low,
            inv_freq / factor,
            torch.where(wavelen >= old_ctx / high, (1 - smooth) * inv_freq / factor + smooth * inv_freq, inv_freq),
        )
        inv_freq = scaled
    else:
        raise SystemExit(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv_freq.float(), position_scale


def rotate_half(x):
    # HF Llama's convention (and lmq's): channel i pairs with i + head_dim/2.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Layer:
    pass


class Llama:
    """Batch-1 Llama with a static KV cache of `max_len` positions.

    q/k/v and gate/up are each stacked into one weight at load time, as a
    fast inference engine (and lmq) does, so the reference is not slowed by
    launches that a plain HF port would make.
    """

    def __init__(self, folder, device, dtype, max_len):
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        self.device, self.dtype = device, dtype
        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.vocab = cfg["vocab_size"]
        self.inter = cfg["intermediate_size"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise SystemExit(f"hidden_act {cfg['hidden_act']!r} is not supported (silu)")
        if max_len > cfg.get("max_position_embeddings", max_len):
            raise SystemExit(f"{max_len} positions exceed max_position_embeddings {cfg['max_position_embeddings']}")
        self.max_len = max_len

        st = SafetensorsFolder(folder)
        get = lambda name: st.get(name, device, dtype)
        maybe = lambda name: get(name) if name in st else None
        self.embed = get("model.embed_tokens.weight")
        # Untied (HF's default) needs lm_head.weight: a missing one is an
        # error, as HF would otherwise start it from random values.
        tied = cfg.get("tie_word_embeddings", False)
        self.lm_head = self.embed if tied else get("lm_head.weight")
        self.norm_w = get("model.norm.weight")
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            L = Layer()
            L.ln1 = get(p + "input_layernorm.weight")
            L.ln2 = get(p + "post_attention_layernorm.weight")
            L.wqkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            L.bqkv = torch.cat(biases) if all(b is not None for b in biases) else None
            L.wo = get(p + "self_attn.o_proj.weight")
            L.bo = maybe(p + "self_attn.o_proj.bias")
            L.w13 = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            L.w2 = get(p + "mlp.down_proj.weight")
            self.layers.append(L)
        del st

        # cos/sin tables for every position, formed in fp32 as HF does and
        # then rounded to the compute dtype.
        inv_freq, scale = rope_inv_freq(self.head_dim, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32) * scale, inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

        # Zeroed, not empty: decode attends over the whole static cache and
        # masks the unused tail, and a NaN left in uninitialised memory
        # would survive a zero attention weight (0 * NaN = NaN).
        shape = (self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.n_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.n_layers)]
        # Token history (prompt, then generated ids) and the current
        # position live on the device, so one decode step reads its input
        # token from and writes its output token to device memory, and a
        # captured graph can be replayed back to back without the host.
        self.hist = torch.zeros(max_len + 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.key_pos = torch.arange(max_len, device=device)

    def weight_bytes_per_token(self):
        """Bytes of the weights one decode token reads: the decoder linears and the output projection."""
        linears = [w for L in self.layers for w in (L.wqkv, L.wo, L.w13, L.w2)] + [self.lm_head]
        return sum(w.numel() * w.element_size() for w in linears)

    def kv_bytes_per_token(self):
        return self.n_layers * 2 * self.n_kv * self.head_dim * self.k_cache[0].element_size()

    def rms_norm(self, x, w):
        # torch.rms_norm (torch 2.4+) is one fused kernel on CUDA in recent
        # versions instead of about seven; it computes in fp32 inside, so in
        # fp32 it equals HF's formulation up to rounding (the check mode
        # tests this path) and in fp16 it differs only in where the last
        # rounding happens.
        if hasattr(torch, "rms_norm"):
            return torch.rms_norm(x, (x.shape[-1],), w, self.eps)
        # HF Llama: normalise in fp32, round to the compute dtype, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def mlp(self, L, x):
        gate, up = F.linear(self.rms_norm(x, L.ln2), L.w13).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, L.w2)

    def logits(self, x):
        return F.linear(self.rms_norm(x, self.norm_w), self.lm_head)

    def prefill(self, ids):
        """Runs the prompt `ids` ([T], positions 0..T-1), fills the cache, returns the last position's logits."""
        T = ids.numel()
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[:T], self.sin[:T]
        for i, L in enumerate(self.layers):
            q, k, v = F.linear(self.rms_norm(x, L.ln1), L.wqkv, L.bqkv).split(self.qkv_sizes, dim=-1)
            q = q.view(T, self.n_heads, self.head_dim).transpose(0, 1)
            k = k.view(T, self.n_kv, self.head_dim).transpose(0, 1)
            v = v.view(T, self.n_kv, self.head_dim).transpose(0, 1)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k_cache[i][:, :T] = k
            self.v_cache[i][:, :T] = v
            if self.group > 1:
                # Query head h reads kv head h // group, as HF's repeat_kv.
                k = k.repeat_interleave(self.group, dim=0)
                v = v.repeat_interleave(self.group, dim=0)
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)
            x = x + F.linear(a[0].transpose(0, 1).reshape(T, -1), L.wo, L.bo)
            x = self.mlp(L, x)
        # Only the last position's logits are needed to pick the next token.
        return self.logits(x[-1:])

    def decode_step(self):
        """One greedy step at position self.pos: reads hist[pos], writes hist[pos+1], advances pos.

        Only in-place updates of fixed buffers, so the step can be captured
        in a CUDA graph and replayed as is.
        """
        pos = self.pos
        x = F.embedding(self.hist.index_select(0, pos), self.embed)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        # Keys at positions up to and including the current one; the rest
        # of the static cache is masked out.
        mask = (self.key_pos <= pos).view(1, 1, 1, -1)
        for i, L in enumerate(self.layers):
            q, k, v = F.linear(self.rms_norm(x, L.ln1), L.wqkv, L.bqkv).split(self.qkv_sizes, dim=-1)
            q = q.view(self.n_heads, self.head_dim)
            k = k.view(self.n_kv, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.k_cache[i].index_copy_(1, pos, k.view(self.n_kv, 1, self.head_dim))
            self.v_cache[i].index_copy_(1, pos, v.view(self.n_kv, 1, self.head_dim))
            # All query heads of one kv head are at the same position, so
            # they can be passed as that kv head's query rows: GQA without
            # repeating the cache.
            a = F.scaled_dot_product_attention(
                q.view(1, self.n_kv, self.group, self.head_dim),
                self.k_cache[i][None],
                self.v_cache[i][None],
                attn_mask=mask,
            )
            x = x + F.linear(a.reshape(1, -1), L.wo, L.bo)
            x = self.mlp(L, x)
        logits = self.logits(x)
        self.hist.index_copy_(0, pos + 1, logits.argmax(-1))
        self.pos.add_(1)
        return logits


class Runner:
    """Greedy generation with the decode step run eagerly or replayed from a CUDA graph."""

    def __init__(self, model, use_graph, compile_step):
        self.model = model
        self.step = torch.compile(model.decode_step) if compile_step else model.decode_step
        self.graph = None
        if use_graph:
            self.capture()

    def capture(self):
        m = self.model
        # Warm-up steps on a side stream before capture (what PyTorch's
        # CUDA graph notes ask for: lazy initialisation and autotuning must
        # not happen inside the capture). They run from position 0 and only
        # leave values in the cache that a later prefill overwrites or the
        # mask hides.
        m.pos.zero_()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        m.pos.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def sync(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    def generate(self, prompt, output_len, eager=False):
        """Returns (generated ids, first-step logits, prefill seconds, decode seconds)."""
        m = self.model
        T = prompt.numel()
        self.sync()
        t0 = time.perf_counter()
        first_logits = m.prefill(prompt)
        m.hist[:T] = prompt
        m.hist[T : T + 1] = first_logits.argmax(-1)
        m.pos.fill_(T)
        self.sync()
        t1 = time.perf_counter()
        for _ in range(output_len - 1):
            if self.graph is not None and not eager:
                self.graph.replay()
            else:
                self.step()
        self.sync()
        t2 = time.perf_counter()
        return m.hist[T : T + output_len].tolist(), first_logits, t1 - t0, t2 - t1


def prompt_ids(n, vocab, device):
    # A fixed prompt, the same on every run and machine; the values only
    # need to be valid ids spread over the vocabulary.
    return torch.tensor([(i * 7919 + 13) % vocab for i in range(n)], dtype=torch.long, device=device)


def median(values):
    # The same median as `lmq bench --latency`: the upper middle element.
    values = sorted(values)
    return values[len(values) // 2] if values else None


def bench(args):
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    input_len, output_len = args.input_len or 128, args.output_len or 128
    use_graph = device.type == "cuda" and not args.no_graph
    t = time.perf_counter()
    # At least 4 positions, so that the graph's warm-up steps from
    # position 0 stay inside the cache even for a 1 + 1 run.
    model = Llama(args.model, device, dtype, max(input_len + output_len, 4))
    load_s = time.perf_counter() - t
    runner = Runner(model, use_graph, args.compile)
    prompt = prompt_ids(input_len, model.vocab, device)

    # With a graph, one eager run first: its tokens are compared with the
    # graph's, so a wrong capture shows up in the output.
    eager_tokens = runner.generate(prompt, output_len, eager=True)[0] if use_graph else None
    prefill, decode, tokens_seen = [], [], set()
    for i in range(args.iterations + 1):
        tokens, _, tp, td = runner.generate(prompt, output_len)
        tokens_seen.add(tuple(tokens))
        if i == 0:
            continue  # warm-up at the measured size, as lmq bench does
        prefill.append(input_len / max(tp, 1e-9))
        if output_len > 1:
            decode.append((output_len - 1) / max(td, 1e-9))
    context = input_len + output_len // 2
    report = {
        "prefill_tok_per_s": median(prefill),
        "decode_tok_per_s": median(decode),
        "input_len": input_len,
        "output_len": output_len,
        "iterations": len(prefill),
        "device": str(device),
        "dtype": args.dtype,
        "graph": use_graph,
        "compile": args.compile,
        "torch_version": torch.__version__,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # Weights plus the KV of the mean context, as lmq's JSON counts
        # them, for a bandwidth bound when lmq's own number is not at hand.
        "decode_bytes_per_token": model.weight_bytes_per_token() + model.kv_bytes_per_token() * context,
        "load_s": load_s,
        "tokens": tokens[:16],
        "tokens_same_every_run": len(tokens_seen) == 1,
        "graph_matches_eager": (eager_tokens == tokens) if use_graph else None,
    }
    print(json.dumps(report))


def check_against_transformers(args):
    """Greedy tokens and first-step logits of this script against HF transformers, fp32 on the CPU."""
    from transformers import LlamaForCausalLM

    input_len, output_len = args.input_len or 16, args.output_len or 16
    device = torch.device("cpu")
    model = Llama(args.model, device, torch.float32, input_len + output_len)
    prompt = prompt_ids(input_len, model.vocab, device)
    with torch.no_grad():
        ours, ours_logits, _, _ = Runner(model, False, False).generate(prompt, output_len)
        ours_logits = ours_logits[0]

    hf = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    ids = prompt[None].clone()
    theirs, theirs_logits = [], None
    with torch.no_grad():
        # The whole sequence is recomputed each step (no cache): slower but
        # free of any generation defaults (stopping at EOS, for one).
        for step in range(output_len):
            logits = hf(ids).logits[0, -1]
            if step == 0:
                theirs_logits = logits
            nxt = int(logits.argmax())
            theirs.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)

    diff = (ours_logits - theirs_logits).abs().max().item()
    scale = theirs_logits.abs().max().item()
    same = sum(a == b for a, b in zip(ours, theirs))
    result = {
        "input_len": input_len,
        "output_len": output_len,
        "logits_max_abs_diff": diff,
        "logits_max_abs": scale,
        "logits_rel_diff": diff / max(scale, 1e-30),
        "tokens_agree": f"{same}/{output_len}",
        "tokens": ours,
        "transformers_tokens": theirs,
        "torch_version": torch.__version__,
    }
    print(json.dumps(result))
    ok = ours == theirs and diff <= 1e-3 * scale
    print("check against transformers:", "passed" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face-style Llama folder")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128; 16 with --check-against-transformers)")
    p.add_argument("--output-len", type=int, help="generated tokens (default 128; 16 with --check-against-transformers)")
    p.add_argument("--iterations", type=int, default=3, help="timed runs after one warm-up; medians are reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=["fp16", "fp32"], help="compute dtype (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-graph", action="store_true", help="run decode steps eagerly instead of replaying a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (then captured as usual)")
    p.add_argument("--check-against-transformers", action="store_true",
                   help="CPU fp32 check of greedy tokens and logits against HF transformers")
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    for name in ("input_len", "output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.set_grad_enabled(False)
    if args.check_against_transformers:
        return check_against_transformers(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
