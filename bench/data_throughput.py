"""Data-loader throughput beside what training consumes, on this machine.

    python bench/data_throughput.py [--docs 12000] [--seconds 6]

1. Writes token-id shards in the prepared format (KEY.json = {"ids": [...]}, length indexes,
   manifest.json with token counts) to a temporary folder: documents of 40..1200 tokens (mean ~420, like web text),
   ids drawn from a Zipf-like law over a 32k vocabulary. Tokenizing is `encdec prepare`'s job,
   done once offline, so it is not part of the stream.
2. Streams span-corruption examples with 512-token inputs (documents packed to fill them) through
   the real DataStream, with 1 and 2 loader workers, and reports examples/s and tokens/s (real
   source + target tokens, padding excluded), after the first batch (worker start-up).
3. Times real forward+backward+AdamW steps of the demo and transformer-base models (fp32 on CPU,
   all cores) on one micro-batch and reports the examples/s one training process consumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.packed import INDEX_DTYPE, index_name  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.mixture import Component  # noqa: E402
from data.spec import StreamSpec, Vocab  # noqa: E402
from data.stream import DataStream, resolve_shards  # noqa: E402
from launcher.config import load_config  # noqa: E402
from model import build, padded_vocab  # noqa: E402
import dataclasses  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_shards(out: str, n_docs: int, per_shard: int = 2000, vocab: int = 32000, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    shards, total, lengths = [], 0, []
    with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n_docs):
            n = int(np.clip(rng.lognormal(5.8, 0.6), 40, 1200))
            ids = np.minimum(rng.zipf(1.2, n) + 102, vocab - 1).tolist() + [1]
            if i % per_shard == 0:
                shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0, "num_tokens": 0,
                               "index": index_name(f"shard-{len(shards):06d}.tar"), "doc_tokens": 0})
                lengths.append([])
            w.write({"__key__": f"{i:010d}", "json": json.dumps({"ids": ids}).encode()})
            shards[-1]["num_samples"] += 1
            shards[-1]["num_tokens"] += len(ids)
            shards[-1]["doc_tokens"] += len(ids) - 1
            lengths[-1].append(len(ids) - 1)
            total += len(ids)
    for s, ls in zip(shards, lengths):                  # the length index (exact packing)
        with open(os.path.join(out, s["index"]), "wb") as f:
            f.write(np.asarray(ls, dtype=INDEX_DTYPE).tobytes())
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"objective": "span", "num_samples": n_docs, "num_tokens": total, "shards": shards}, f)
    return total


def stream_rate(data: str, workers: int, seconds: float, micro_batch: int = 64) -> tuple[float, float, int]:
    d = DataConfig(num_streams=8, shuffle_block=1024, seed=0, max_src_len=512, max_tgt_len=128)
    spec = StreamSpec(d, [Component("", resolve_shards(data), "span")], micro_batch, True,
                      Vocab(0, tuple(range(3, 103))))
    stream = DataStream(spec, dp_rank=0, dp_size=1, micro_batch=micro_batch, num_workers=workers)
    it = iter(stream)
    next(it)                                            # workers started, first blocks read
    t0, n, tokens = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["src"].shape[0]
        tokens += sum(b["n_real"])
    dt = time.perf_counter() - t0
    return n / dt, tokens / dt, b["src"].shape[1]


def train_rate(config: str, micro_batch: int, src_len: int, tgt_len: int, vocab: int, steps: int) -> float:
    cfg = load_config(os.path.join(ROOT, config))
    mc = dataclasses.replace(cfg.model, real_vocab_size=vocab, vocab_size=padded_vocab(vocab, cfg.model.vocab_multiple))
    torch.manual_seed(0)
    model = build(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src = torch.randint(3, vocab, (micro_batch, src_len))
    tgt = torch.randint(3, vocab, (micro_batch, tgt_len))
    mask = torch.ones_like(src, dtype=torch.bool)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss, cnt = model(src, mask, tgt, tgt)
        (loss / cnt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return micro_batch / float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed streaming per worker count")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="encdec-bench-")
    try:
        t = time.perf_counter()
        total = write_shards(tmp, a.docs)
        print(f"wrote {a.docs} documents, {total} tokens in {time.perf_counter() - t:.1f} s "
              f"({os.cpu_count()} CPU cores here)")
        print("\nspan-corruption stream, 512-token inputs (packed), micro-batch 64, one rank:")
        print(f"  {'workers':>7} {'examples/s':>11} {'tokens/s':>11} {'examples/s/worker':>18}")
        rates = {}
        for w in (1, 2):
            ex, tok, S = stream_rate(tmp, w, a.seconds)
            rates[w] = ex
            print(f"  {w:>7} {ex:>11,.0f} {tok:>11,.0f} {ex / w:>18,.0f}    (input length {S})")
        print("\ntraining consumption, one process on this machine (fp32 fwd+bwd+AdamW, median of 2-3 steps):")
        print(f"  {'config':<36} {'micro-batch':>11} {'src x tgt':>10} {'examples/s':>11} {'1-worker stream / model':>24}")
        for name, path, mb, S, T, vocab, steps in (("demo", "configs/demo.yaml", 32, 32, 16, 600, 3),
                                                   ("base", "configs/transformer-base.yaml", 2, 512, 128, 32000, 2)):
            r = train_rate(path, mb, S, T, vocab, steps=steps)
            print(f"  {name + ' (' + path + ')':<36} {mb:>11} {f'{S}x{T}':>10} {r:>11,.2f} {rates[1] / r:>23,.0f}x")
        print("\ntarget: >= 5,000 examples/s per loader worker core")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
