"""`encdec prepare` throughput: MB of raw text per second, 1 process and N processes side by side.

    python bench/prepare_throughput.py [--mb 24] [--files 8] [--workers 2] [--vocab 8000]

Writes a JSONL corpus of --files files (real English text, bench/real_text.py, cycled), trains
one tokenizer on a 4 MB sample (timed apart), then runs the whole prepare (read, parse, tokenize, write shards + indexes + manifest)
with that tokenizer in 1 process and in --workers processes, and prints MB/s in total and per
process (one tokenizer thread each: RAYON_NUM_THREADS=1 unless set). Target: >= 5 MB/s per core end
to end. The two outputs are compared byte for byte.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one tokenizer thread per process (inherited by the workers), so "per process" means per core
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from bench.real_text import collect  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


def write_corpus(root: str, mb: float, files: int) -> list[str]:
    """Real English text (bench/real_text.py), cycled to mb megabytes over `files` JSONL files."""
    docs = [json.dumps({"text": d}) + "\n" for d in collect(4_300_000)]
    paths, per_file, k = [], mb * 1e6 / files, 0
    for f in range(files):
        p = os.path.join(root, f"part-{f:03d}.jsonl")
        size = 0
        with open(p, "w", encoding="utf-8") as out:
            while size < per_file:
                out.write(docs[k % len(docs)])
                size += len(docs[k % len(docs)])
                k += 1
        paths.append(p)
    return paths


def same_tree(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
               for n in names if n != "manifest.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=24)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="encdec-prepare-bench-")
    try:
        paths = write_corpus(root, a.mb, a.files)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        t0 = time.perf_counter()
        prepare(paths[:1], os.path.join(root, "tok"), vocab_size=a.vocab, tokenizer_sample=4 << 20, progress=False,
                unit_bytes=1 << 40)
        t_tok = time.perf_counter() - t0
        print(f"corpus: {mb:.1f} MB in {a.files} files; cores: {os.cpu_count()}, load average "
              f"{os.getloadavg()[0]:.1f}; tokenizer ({a.vocab}) trained on a 4 MB sample + first file prepared "
              f"in {t_tok:.1f} s")
        tok = load_tokenizer(os.path.join(root, "tok"))
        with open(paths[0], encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        t0 = time.perf_counter()
        tok.encode_batch(texts)
        t_enc = time.perf_counter() - t0
        print(f"tokenizer alone (encode_batch, 1 thread): {os.path.getsize(paths[0]) / 1e6 / t_enc:.2f} MB/s")
        rates = {}
        for n in (1, a.workers):
            out = os.path.join(root, f"out{n}")
            t0 = time.perf_counter()
            man = prepare(paths, out, tokenizer=os.path.join(root, "tok"), workers=n, progress=False,
                          unit_bytes=int(mb * 1e6 / a.files))
            dt = time.perf_counter() - t0
            rates[n] = mb / dt
            print(f"workers={n}: {dt:6.1f} s  {mb / dt:6.2f} MB/s total  {mb / dt / n:6.2f} MB/s per process  "
                  f"({man['num_samples']} docs, {man['num_tokens'] / 1e6:.1f} M tokens, {len(man['shards'])} shards)")
        print(f"speed-up {a.workers} vs 1 process: {rates[a.workers] / rates[1]:.2f}x; "
              f"outputs identical: {same_tree(os.path.join(root, 'out1'), os.path.join(root, f'out{a.workers}'))}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
