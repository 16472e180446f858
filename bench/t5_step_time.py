"""Training step time of model.arch=t5 beside the seed Transformer at the same size, on this machine's CPU.

    python bench/t5_step_time.py [--d-model 256] [--layers 4] [--steps 6] [--threads N]

Same d_model, heads, layers, d_ff, vocabulary and batch; one step = forward + backward + AdamW,
fp32. T5 v1.1 differs in cost by its gated FFN (three d x d_ff matrices instead of two), its
untied output head (one more V x d matmul's gradient), the relative position bias (a float
attention mask, which rules out SDPA's mask-free fast path) and RMS norms. A second T5 line uses
d_ff x 2/3 (the parameter-matched gated FFN) so the comparison at equal parameters is there too.
Prints median step times, parameter counts and the ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import build, count_parameters, make_config  # noqa: E402


def step_time(c: ModelConfig, batch: int, src_len: int, tgt_len: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, c.vocab_size, (batch, src_len), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.randint(3, c.vocab_size, (batch, tgt_len + 1), generator=g)
    times = []
    for i in range(steps + 1):                        # the first step (allocations) is not counted
        t0 = time.perf_counter()
        loss, n = model(src, mask, tgt[:, :-1], tgt[:, 1:])
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=256)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="t5 applies it to attention probabilities too, as Hugging Face does (SDPA's math path)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shared = dict(vocab_size=a.vocab, real_vocab_size=a.vocab, d_model=a.d_model, n_heads=a.heads, d_ff=a.d_ff,
                  n_encoder_layers=a.layers, n_decoder_layers=a.layers, dropout=a.dropout,
                  max_positions=max(a.src_len, a.tgt_len))
    base = make_config(**shared)
    t5 = make_config(arch="t5", **{**shared, "layer_norm_eps": 1e-6})
    t5_matched = dataclasses.replace(t5, d_ff=a.d_ff * 2 // 3)
    print(f"CPU, {torch.get_num_threads()} threads, fp32; batch {a.batch} x src {a.src_len} / tgt {a.tgt_len}, "
          f"d_model {a.d_model}, {a.heads} heads, {a.layers}+{a.layers} layers, vocab {a.vocab}, dropout {a.dropout}")
    ref = None
    for name, c in (("transformer (seed)", base), ("t5 v1.1, same d_ff", t5), ("t5 v1.1, d_ff x 2/3", t5_matched)):
        s = step_time(c, a.batch, a.src_len, a.tgt_len, a.steps)
        ref = ref or s
        print(f"{name:22s} d_ff {c.d_ff:5d}  params {count_parameters(c) / 1e6:7.2f}M  "
              f"step {s * 1000:8.1f} ms  ratio {s / ref:5.2f}")


if __name__ == "__main__":
    main()
