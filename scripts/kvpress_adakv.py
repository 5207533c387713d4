"""kvpress's AdaKV (per-head budgets) on SmolLM2's public summarize prompt: for AdaKVPress around
SnapKVPress and around ExpectedAttentionPress at compression ratio 0.5 (alpha_safeguard 0.2, its
default), one forward pass of the whole prompt inside `with press(model)`, then 32 greedy tokens.
AdaKV frees nothing in kvpress: it masks the pruned (head, position) pairs at decode time, so the
kept positions are read from the mask it leaves on every attention module (`masked_key_indices`).
Writes per press the generated ids and, per layer and KV head, how many positions are kept and
which (a bitmask over the prompt's positions, hex, position 0 in the lowest bit of the first byte).

Usage: kvpress_adakv.py PROMPTS.json HF_DIR OUT.json
  PROMPTS.json: ../shared/reference/smollm2-135m-q4_1.json (summarize.prompt_ids)
  HF_DIR: SmolLM2-135M-Instruct Q4_1 dequantized to an f32 Hugging Face folder
Environment: kvpress 0.5.5, transformers 5.2.0 (kvpress needs < 5.3), torch on the CPU."""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
import kvpress
from kvpress import AdaKVPress, ExpectedAttentionPress, SnapKVPress

torch.set_num_threads(2)
prompts, hf_dir, out_path = sys.argv[1:4]
ids = json.load(open(prompts))["summarize"]["prompt_ids"]
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
attention = [layer.self_attn for layer in model.model.layers]
presses = {
    "ada-snapkv": lambda: AdaKVPress(SnapKVPress(compression_ratio=0.5)),
    "ada-expected-attention": lambda: AdaKVPress(ExpectedAttentionPress(compression_ratio=0.5)),
}


def bitmask(kept, n):
    bits = bytearray((n + 7) // 8)
    for p in kept:
        bits[p // 8] |= 1 << (p % 8)
    return bits.hex()


@torch.no_grad()
def run(press, n_new=32):
    cache, x = DynamicCache(), torch.tensor([ids])
    with press(model):
        out = model(x, past_key_values=cache, use_cache=True)
    kept, counts = [], []
    for module in attention:
        _, heads, seqs = module.masked_key_indices
        n_heads = model.config.num_key_value_heads
        pruned = [set() for _ in range(n_heads)]
        for h, s in zip(heads.tolist(), seqs.tolist()):
            pruned[h].add(s)
        layer = [[p for p in range(len(ids)) if p not in pruned[h]] for h in range(n_heads)]
        kept.append([bitmask(k, len(ids)) for k in layer])
        counts.append([len(k) for k in layer])
    gen, pos, nxt = [], len(ids), out.logits[0, -1].argmax().item()
    for _ in range(n_new):
        gen.append(nxt)
        if nxt == 2:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos]))
        pos += 1
        nxt = out.logits[0, -1].argmax().item()
    for module in attention:
        module.masked_key_indices = None
    return gen, kept, counts


result = {"about": __doc__.split("\n\n")[0], "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
          "transformers": transformers.__version__, "prompt_len": len(ids), "presses": {}}
for name, make in presses.items():
    gen, kept, counts = run(make())
    result["presses"][name] = {"ids": gen, "kept_per_head": counts, "kept": kept}
    print(name, gen[:12], counts[:3], flush=True)
json.dump(result, open(out_path, "w"), indent=None, separators=(",", ":"))
