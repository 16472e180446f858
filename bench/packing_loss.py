"""Packing loss per epoch: tokens dropped and repeated, old per-block chunk counts vs exact packing.

    python bench/packing_loss.py [--chars 4300000] [--max-src-len 512]

A real English corpus (bench/real_text.py: license texts then docstrings, grouped as collected,
and the same documents shuffled) is prepared with `encdec prepare` (one tokenizer, vocabulary
8000). For each document order and shuffle block, one epoch of span-corruption chunks is read
through the stream's readers (8 streams) and compared with the corpus as token multisets:
dropped = tokens of the corpus missing from the epoch, repeated = tokens the epoch has too many.
"Old" is the same folder read without its length indexes (the fallback for folders prepared
before them); "exact" uses them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.real_text import collect  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.records import decode  # noqa: E402
from data.tar import iter_samples  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.mixture import Component  # noqa: E402
from data.spec import StreamSpec, Vocab  # noqa: E402
from data.stream import Layout, resolve_shards  # noqa: E402


def corpus_counts(shards, size: int) -> np.ndarray:
    c = np.zeros(size, dtype=np.int64)
    for s in shards:
        for key, raw in iter_samples(s.url):
            c += np.bincount(decode(raw, "span", s.url, key), minlength=size)
    return c


def epoch_loss(shards, block: int, max_src_len: int, size: int, want: np.ndarray) -> tuple[float, float]:
    d = DataConfig(num_streams=8, shuffle_block=block, seed=0, max_src_len=max_src_len, max_tgt_len=max_src_len)
    spec = StreamSpec(d, [Component("", shards, "span")], 8, True, Vocab(0, tuple(range(3, 103))))
    lay, got = Layout(spec), np.zeros(size, dtype=np.int64)
    for g in range(spec.epoch_positions):
        c, v, e, i = lay.locate(g)
        item = lay.reader(c, v).item(e, i)
        if item is not None:
            got += np.bincount(item[1], minlength=size)
    n = want.sum()
    return np.clip(want - got, 0, None).sum() / n, np.clip(got - want, 0, None).sum() / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=4_300_000)
    ap.add_argument("--max-src-len", type=int, default=512)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="encdec-packing-bench-")
    try:
        docs = collect(a.chars)
        shuffled = list(docs)
        random.Random(0).shuffle(shuffled)
        folders = {}
        for name, ds in (("as collected", docs), ("shuffled", shuffled)):
            path = os.path.join(root, name.replace(" ", "_") + ".jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in ds)
            out = os.path.join(root, name.replace(" ", "_"))
            prepare([path], out, vocab_size=8000, tokenizer=folders.get("as collected"), progress=False,
                    shard_size=1000)
            folders[name] = out
        print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M characters; "
              f"max_src_len={a.max_src_len}, 8 streams, one epoch")
        print("| document order | shuffle_block | old: dropped | old: repeated | exact: dropped | exact: repeated |")
        print("|---|---|---|---|---|---|")
        for name, folder in folders.items():
            shards = resolve_shards(folder)
            size = 8000 + 200
            want = corpus_counts(shards, size)
            old = [dataclasses.replace(s, index="", doc_tokens=-1) for s in shards]
            for block in (1024, 256):
                od, orp = epoch_loss(old, block, a.max_src_len, size, want)
                ed, erp = epoch_loss(shards, block, a.max_src_len, size, want)
                print(f"| {name} | {block} | {od:.1%} | {orp:.1%} | {ed:.3%} | {erp:.3%} |")
        print(f"({int(want.sum())} tokens per epoch)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
