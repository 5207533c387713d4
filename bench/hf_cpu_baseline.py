#!/usr/bin/env python3
"""HF transformers on torch CPU, the prefill and decode figures `bench/cpu_vs_llamacpp.sh` sets
easykv beside: a Hugging Face model directory (for SmolLM2:
`cargo xtask convert-weights --input smollm2 --output DIR --dtype f32`), f32, SDPA attention,
batch 1, greedy.

    python3 bench/hf_cpu_baseline.py DIR [--threads 2] [--rounds 2]

pp512: one forward pass over 512 prompt tokens. tg128: 128 tokens generated after a 1-token
prompt (as llama-bench's tg128). Prints one line per round.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    vocab = model.config.vocab_size
    prompt = (torch.arange(512) * 7919 % vocab).unsqueeze(0)
    with torch.inference_mode():
        model(prompt[:, :16])  # warm-up
        for r in range(args.rounds):
            t = time.perf_counter()
            model(prompt)
            pp = 512 / (time.perf_counter() - t)
            t = time.perf_counter()
            out = model.generate(prompt[:, :1], max_new_tokens=128, min_new_tokens=128, do_sample=False)
            tg = (out.shape[1] - 1) / (time.perf_counter() - t)
            print(f"round {r + 1}  HF transformers {torch.__version__} pp512 {pp:8.1f} tok/s   tg128 {tg:8.1f} tok/s")


if __name__ == "__main__":
    main()
