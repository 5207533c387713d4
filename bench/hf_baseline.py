#!/usr/bin/env python3
"""The baseline easykv's GPU benchmark is compared against: HF transformers, eager attention.

A model of Llama-2-7B's shape with random weights (no download), batch 1, a prompt of random
token ids, greedy decoding. Runs the full cache and an EasyKV-style eviction (encoding mode:
prefill the first part of the prompt in one pass, then chunks of `--stride` tokens, evicting
`stride` slots per layer and KV head after each chunk by the policy's score; generation then
appends without eviction, as EasyKV does). Prints one JSON object per configuration:
prefill seconds and tokens/s, decode tokens/s, peak GPU memory, KV bytes held.

    python3 bench/hf_baseline.py --prompt-tokens 4096 --new-tokens 256 --budgets full,0.5,0.25 --policies roco,h2o --stride 64

With `--batch N` (N > 1) it measures what a server would run instead: N prompts at once through
`generate` with a static cache (SDPA attention, the full cache, greedy, every sequence decoding
`--new-tokens`), and prints the output tokens/s over the whole run (prefill included), per
sequence, and the peak memory.
"""

import argparse
import json
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-5),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
SINKS, RECENT_RATIO, ROCO_TAIL = 4, 0.1, 10


def kv_layers(cache):
    """Per-layer (keys, values) of a transformers cache, whatever its version."""
    if hasattr(cache, "layers"):  # transformers ≥ 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return list(cache)


def set_kv(cache, i, k, v):
    """Replaces layer i's keys and values in place."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys, cache.layers[i].values = k, v
    else:
        cache.key_cache[i], cache.value_cache[i] = k, v


def sync():
    torch.cuda.synchronize()


class Scores:
    """EasyKV's per-slot statistics for one layer: attention sum, sum of squares, count."""

    def __init__(self):
        self.sum = self.sq = self.count = None

    def add(self, probs, kv_heads):
        # probs: [1, heads, q, n], averaged over the query heads that share a KV head (as EasyKV).
        heads, q, n = probs.shape[1:]
        p = probs[0].float().view(kv_heads, heads // kv_heads, q, n).mean(1)
        s, q2 = p.sum(1), (p * p).sum(1)
        heads, q, n = p.shape
        # Queries of this chunk that saw slot j: all q for older slots, q − t for its own token t.
        j = torch.arange(n, device=p.device)
        seen = torch.where(j < n - q, q, q - (j - (n - q))).float().expand(heads, n)
        if self.sum is None:
            self.sum, self.sq, self.count = s, q2, seen.clone()
        else:
            pad = n - self.sum.shape[1]
            z = torch.zeros(heads, pad, device=p.device)
            self.sum = torch.cat([self.sum, z], 1) + s
            self.sq = torch.cat([self.sq, z], 1) + q2
            self.count = torch.cat([self.count, z], 1) + seen

    def keep(self, policy, budget, stride):
        """Indices [heads, n - stride] of the slots to keep."""
        n = self.sum.shape[1]
        recent = int(budget * RECENT_RATIO)
        if policy == "h2o":
            score = self.sum.clone()
            score[:, :SINKS] = float("inf")
            score[:, n - recent:] = float("inf")
            evict = score.topk(stride, dim=1, largest=False).indices
        else:  # roco: among the most stable slots (smallest σ), evict the lowest mean attention
            mean = self.sum / self.count.clamp(min=1)
            std = (self.sq / self.count.clamp(min=1) - mean * mean).clamp(min=0).sqrt()
            std[:, :SINKS] = float("inf")
            std[:, n - ROCO_TAIL:] = float("inf")
            k = max(budget - recent - SINKS, stride)
            candidates = std.topk(min(k, n), dim=1, largest=False).indices
            pick = mean.gather(1, candidates).topk(stride, dim=1, largest=False).indices
            evict = candidates.gather(1, pick)
        mask = torch.ones_like(self.sum, dtype=torch.bool)
        mask.scatter_(1, evict, False)
        keep = mask.nonzero()[:, 1].view(mask.shape[0], -1)
        self.sum, self.sq, self.count = (t.gather(1, keep) for t in (self.sum, self.sq, self.count))
        return keep


def run(model, prompt, new_tokens, policy, budget, stride):
    device = prompt.device
    n = prompt.shape[1]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        if policy == "full":
            out = model(prompt, use_cache=True)
            cache, logits, pos = out.past_key_values, out.logits[:, -1], n
        else:
            b = int(n * budget) + stride
            idx = max(i for i in range(b + 1) if (n - i) % stride == 0)
            first = idx - stride
            out = model(prompt[:, :first], use_cache=True)
            cache = out.past_key_values
            scores = [Scores() for _ in kv_layers(cache)]
            pos = first
            while pos < n:
                chunk = prompt[:, pos:pos + stride]
                held = kv_layers(cache)[0][0].shape[2]
                out = model(chunk, past_key_values=cache, use_cache=True, output_attentions=True,
                            position_ids=torch.arange(pos, pos + stride, device=device)[None],
                            attention_mask=torch.ones(1, held + stride, dtype=torch.long, device=device))
                cache = out.past_key_values
                pos += stride
                for i, (k, v) in enumerate(kv_layers(cache)):
                    scores[i].add(out.attentions[i], k.shape[1])
                    if k.shape[2] > idx:
                        keep = scores[i].keep(policy, b, stride)[None, :, :, None].expand(1, -1, -1, k.shape[3])
                        set_kv(cache, i, k.gather(2, keep), v.gather(2, keep))
            logits = out.logits[:, -1]
        sync()
        prefill = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for step in range(new_tokens - 1):
            held = kv_layers(cache)[0][0].shape[2]
            out = model(token, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[pos + step]], device=device),
                        attention_mask=torch.ones(1, held + 1, dtype=torch.long, device=device))
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.item()  # a real generation reads every token back
        sync()
        decode = time.perf_counter() - t1
    kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv_layers(cache))
    return {
        "policy": policy, "budget": budget if policy != "full" else "full", "prompt_tokens": n,
        "new_tokens": new_tokens, "prefill_seconds": round(prefill, 3),
        "prefill_tokens_per_second": round(n / prefill, 1),
        "decode_tokens_per_second": round((new_tokens - 1) / decode, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "kv_bytes": kv,
    }


def run_batch(model, prompts, new_tokens):
    """N sequences together through generate() with a static cache; output tokens/s."""
    batch, n = prompts.shape
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                             pad_token_id=0)
    sync()
    seconds = time.perf_counter() - t0
    generated = (out.shape[1] - n) * batch
    return {
        "batch": batch, "prompt_tokens": n, "new_tokens": new_tokens, "seconds": round(seconds, 3),
        "output_tokens_per_second": round(generated / seconds, 1),
        "per_sequence_tokens_per_second": round(generated / batch / seconds, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budgets", default="full,0.5,0.25")
    ap.add_argument("--policies", default="roco,h2o")
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=1, help="N > 1: N sequences at once, static cache")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**SHAPES[args.shape])
    # Eviction reads the attention probabilities (eager); the batched baseline runs SDPA.
    config._attn_implementation = "sdpa" if args.batch > 1 else "eager"
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (max(args.batch, 1), args.prompt_tokens), device="cuda")
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(), "shape": args.shape, "dtype": args.dtype}))
    if args.batch > 1:
        run_batch(model, prompt[:, :512], 8)  # warm-up (kernels, allocator)
        print(json.dumps(run_batch(model, prompt, args.new_tokens)), flush=True)
        return
    prompt = prompt[:1]
    run(model, prompt[:, :512], 8, "full", 1.0, args.stride)  # warm-up (kernels, allocator)
    for budget in args.budgets.split(","):
        for policy in (["full"] if budget == "full" else args.policies.split(",")):
            result = run(model, prompt, args.new_tokens, policy, 1.0 if budget == "full" else float(budget), args.stride)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
