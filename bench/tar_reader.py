"""The project's tar reader (data/tar.py) beside the webdataset library's, and raw text beside prepared data.

    python bench/tar_reader.py [--docs 20000] [--text-chars 3000000] [--batches 40]

1. Writes, with the stock wds.ShardWriter, shards of token ids in the prepared layout (KEY.json =
   {"ids": [...]}, documents of 40..1200 tokens) and shards of text (KEY.txt), 5,000 samples each.
2. Reads every sample of them, in turn, through data/tar.py's iter_samples and through webdataset
   (wds.WebDataset(url, shardshuffle=False): its tar iterator and key grouping, no decoding), and
   reports samples/s and MB/s, best of 3; then the time to reach sample 3/4 of a shard (where a
   reader of one canonical stream starts a segment, and where a resume starts): data/tar.py seeks
   past the payloads it skips, webdataset reads through them. Both must give the same samples,
   member for member (checked here on these shards; tests/test_tar_reader.py on odd names).
3. Streams span-corruption examples (512-token inputs, packed, one loader worker) from raw text
   shards tokenized on the fly and from the same shards prepared by `encdec prepare`: the time to
   the first batch (each of the 8 canonical streams reads its first block: 8 x 1024 documents to
   tokenize), then examples/s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from itertools import islice

import numpy as np
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.real_text import collect  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.resolve import Where, check_data  # noqa: E402
from data.spec import StreamSpec, vocab_of  # noqa: E402
from data.stream import DataStream  # noqa: E402
from data.tar import iter_samples  # noqa: E402

PER_SHARD = 5000


def write(folder: str, samples) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(os.path.join(folder, "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as w:
        for s in samples:
            w.write(s)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))


def ids_samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(np.clip(rng.lognormal(5.8, 0.6), 40, 1200))
        yield {"__key__": f"{i:010d}", "json": json.dumps({"ids": (rng.zipf(1.2, k) % 32000 + 103).tolist() + [1]})}


def wds_samples(url: str):
    for s in wds.WebDataset(url, shardshuffle=False, empty_check=False):
        yield s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}


def rate(fn, urls: list[str]) -> tuple[float, float]:
    """Best of 3 full reads: (samples/s, MB/s)."""
    size, best = sum(os.path.getsize(u) for u in urls), float("inf")
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for u in urls for _ in fn(u))
        best = min(best, time.perf_counter() - t)
    return n / best, size / best / 1e6


def skip_time(fn, url: str, k: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        next(fn(url, k))
        best = min(best, time.perf_counter() - t)
    return best


def stream_rate(spec: StreamSpec, batches: int) -> tuple[float, float]:
    """(seconds to the first batch: the worker's start and its streams' first blocks, examples/s after it)."""
    t0 = time.perf_counter()
    it = iter(DataStream(spec, 0, 1, micro_batch=spec.global_batch, num_workers=1))
    next(it)
    t1, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["src"].shape[0]
    return t1 - t0, n / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--text-chars", type=int, default=3_000_000)
    ap.add_argument("--batches", type=int, default=40, help="micro-batches of 64 timed per stream")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="encdec-bench-tar-")
    try:
        texts = collect(a.text_chars)
        kinds = {"token ids (prepared layout)": write(os.path.join(tmp, "ids"), ids_samples(a.docs)),
                 "text (.txt members)": write(os.path.join(tmp, "txt"), ({"__key__": f"{i:08d}", "txt": texts[i % len(
                     texts)]} for i in range(a.docs)))}
        print(f"{a.docs} samples per kind, {PER_SHARD} per shard ({os.cpu_count()} CPU cores here)\n")
        print(f"{'shards':<28} {'reader':<22} {'samples/s':>10} {'MB/s':>8} {'to sample 3/4':>14}")
        for kind, urls in kinds.items():
            same = all(list(iter_samples(u)) == list(wds_samples(u)) for u in urls)
            k = min(PER_SHARD, a.docs) * 3 // 4
            for name, fn, skip in (("data/tar.py", iter_samples, lambda u, k: iter_samples(u, k)),
                                   ("webdataset 1.x", wds_samples, lambda u, k: islice(wds_samples(u), k, None))):
                s, mb = rate(fn, urls)
                print(f"{kind:<28} {name:<22} {s:>10,.0f} {mb:>8,.0f} {skip_time(skip, urls[0], k) * 1e3:>11.1f} ms")
            print(f"{'':<28} same samples, member for member: {'yes' if same else 'NO'}")
        raw = os.path.join(tmp, "txt")
        prepare(kinds["text (.txt members)"], os.path.join(tmp, "prep"), objective="span", vocab_size=8000,
                shard_size=PER_SHARD, unit_bytes=1024, progress=False)
        print("\nspan-corruption stream, 512-token inputs (packed), micro-batch 64, one loader worker:")
        print(f"  {'shards':<44} {'first batch':>11} {'then examples/s':>16}")
        for name, src in (("raw .txt shards (tokenized by the worker)", raw),
                          ("the same prepared (token ids)", os.path.join(tmp, "prep"))):
            d = DataConfig(train=src, objective="span", tokenizer=os.path.join(tmp, "prep"), max_src_len=512,
                           max_tgt_len=128, seed=0)
            found = check_data(d, Where(fallback=os.path.join(tmp, "scan")))
            spec = StreamSpec(d, found.train, 64, True, vocab_of(found.tokenizer, d))
            first, r = stream_rate(spec, a.batches)
            print(f"  {name:<44} {first:>9.1f} s {r:>16,.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
