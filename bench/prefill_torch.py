#!/usr/bin/env python3
"""What PyTorch (cuBLAS, SDPA) reaches on one 7B-shape layer's prefill operations, and HF
transformers' whole prefill: the ceiling `easykv check-kernels --time --prefill N` is read
against. Same shapes as that command; median of CUDA-event timings.

    python3 bench/prefill_torch.py --rows 4096
"""

import argparse
import statistics

import torch


def timed(f, reps=10):
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--model", action="store_true", help="also HF transformers' whole prefill (sdpa)")
    args = ap.parse_args()
    n = args.rows
    dt = torch.float16
    dev = "cuda"
    print(f"{'operation':<36} {'shape':<28} {'µs':>10} {'TFLOP/s':>9}")
    for name, out, inp in [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]:
        x = torch.randn(n, inp, device=dev, dtype=dt) * 0.02
        w = torch.randn(out, inp, device=dev, dtype=dt) * 0.02
        us = timed(lambda: x @ w.t())
        print(f"{'torch matmul ' + name + ', W [out, in]':<36} {f'{n} × [{out}, {inp}]':<28} {us:>10.1f} {2 * n * out * inp / us / 1e6:>9.1f}")
    h, d = 32, 128
    q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=dt) for _ in range(3))
    us = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"{'torch sdpa (causal)':<36} {f'{h} heads × {n} × {n}':<28} {us:>10.1f} {2 * h * n * n * d / us / 1e6:>9.1f}")
    us = timed(lambda: q @ k.transpose(2, 3))
    print(f"{'torch scores q·Kᵀ':<36} {f'{h} heads × {n} × {n}':<28} {us:>10.1f} {2 * h * n * n * d / us / 1e6:>9.1f}")
    if args.model:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=n,
                          rope_theta=10000.0, rms_norm_eps=1e-5, attn_implementation="sdpa")
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(dt).eval()
        ids = torch.randint(0, 32000, (1, n), device=dev)
        with torch.no_grad():
            us = timed(lambda: model(ids, logits_to_keep=1), reps=5)
        print(f"{'HF transformers prefill (sdpa)':<36} {f'{n} tokens':<28} {us:>10.1f} {'':>9}")


if __name__ == "__main__":
    main()
