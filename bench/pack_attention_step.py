"""What document-aware attention (data.pack_attention) costs in training step time on CPU.

    python bench/pack_attention_step.py [--d-model 256] [--layers 4] [--batch 8] [--len 512]

Forward + backward + AdamW of the model on packed span-corruption batches (src --len tokens,
documents of 20..400 tokens), with the padding mask only (default) and with the per-document
mask (SDPA with a (B, 1, S, S) bool mask, the CPU path), side by side, median of 5 steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.transformer import Transformer, TransformerConfig as ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=8064, real_vocab_size=8000, d_model=a.d_model, n_heads=a.d_model // 64,
                    d_ff=4 * a.d_model, n_encoder_layers=a.layers, n_decoder_layers=a.layers, dropout=0.1,
                    max_positions=a.len)
    model = Transformer(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, S, T = a.batch, a.len, a.len // 4
    src = torch.randint(103, 8000, (B, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    seg = torch.zeros(B, S, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for b in range(B):                                   # documents of 20..400 tokens
        pos, k = 0, 0
        while pos < S:
            n = int(torch.randint(20, 400, (1,), generator=g))
            seg[b, pos:pos + n] = k
            pos, k = pos + n, k + 1
    tgt = torch.randint(103, 8000, (B, T))

    def step(segments):
        t0 = time.perf_counter()
        loss, n = model(src, mask, tgt, tgt, src_segments=segments)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    runs = {"padding mask": [], "document mask": []}
    step(None), step(seg)                                # warm-up
    for _ in range(a.steps):                             # alternated: a loaded machine slows both alike
        runs["padding mask"].append(step(None))
        runs["document mask"].append(step(seg))
    times = {k: statistics.median(v) for k, v in runs.items()}
    print(f"d_model {a.d_model}, {a.layers}+{a.layers} layers, batch {B} x {S} source / {T} target tokens, "
          f"{torch.get_num_threads()} threads, {(seg.max(1).values + 1).float().mean():.1f} documents per row")
    for name, t in times.items():
        print(f"{name:14s} {t * 1000:8.1f} ms/step")
    print(f"document mask / padding mask: {times['document mask'] / times['padding mask']:.2f}x")


if __name__ == "__main__":
    main()
