"""`make demo`: the whole path on the embedded default, on this machine.

English number words -> Chinese numerals (a deterministic synthetic corpus, 500 held-out numbers
never seen in training) -> tokenizer + webdataset shards -> ZeRO-2 on the machine's ranks (one per
GPU, or 2 CPU ranks without one: DeepSpeed, NCCL or gloo) -> Hugging Face folder -> transformers
generate() with greedy and beam search (on the GPU when there is one).
The last line is `exact-match greedy=<fraction> beam=<fraction> n=<count>`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from data.synthetic import write_corpus
from launcher.cli import leave, main as cli
from launcher.config import ConfigError, load_config
from launcher.hf.generate import generate, load


def _run(argv: list[str]) -> None:
    print("$ encdec " + " ".join(argv), flush=True)
    rc = cli(argv)
    if rc:
        sys.exit(rc)


def demo_layout(gpus: int, global_batch: int, micro_batch: int) -> tuple[int, list[str]]:
    """(ranks, overrides) that fit this machine: one rank per GPU (the most that divide the global
    batch), or 2 CPU ranks without a GPU; the micro-batch shrunk when the ranks need it."""
    if gpus <= 0:
        return 2, []
    n = max(d for d in range(1, min(gpus, global_batch) + 1) if global_batch % d == 0)
    micro = min(micro_batch, global_batch // n)
    return n, ([f"train.micro_batch_size={micro}"] if micro != micro_batch else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--work", default="runs/demo")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: one per GPU, or 2 on CPU)")
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=300")
    a = p.parse_args(argv)
    t0 = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    corpus, shards = os.path.join(a.work, "corpus"), os.path.join(a.work, "shards")
    train_txt, held_txt = write_corpus(corpus, n_heldout=a.heldout)
    if not os.path.isfile(os.path.join(shards, "train", "manifest.json")):
        _run(["prepare", train_txt, "--out", os.path.join(shards, "train"), "--objective", "pairs",
              "--vocab-size", "600", "--shard-size", "1000", "--overwrite"])
    if not os.path.isfile(os.path.join(shards, "valid", "manifest.json")):
        _run(["prepare", held_txt, "--out", os.path.join(shards, "valid"), "--objective", "pairs",
              "--tokenizer", os.path.join(shards, "train"), "--overwrite"])
    run_dir = os.path.join(a.work, "run")
    try:
        t = load_config(a.config, a.overrides).train
    except ConfigError as e:
        print(f"encdec: error: {e}", file=sys.stderr)
        return 2
    nproc, fit = (a.nproc, []) if a.nproc else demo_layout(torch.cuda.device_count(), t.global_batch_size,
                                                           t.micro_batch_size)
    _run(["train", a.config, f"out_dir={run_dir}", f"data.train={shards}/train", f"data.valid={shards}/valid",
          *fit, *a.overrides, "--nproc", str(nproc)])
    hf_dir = os.path.join(a.work, "hf")
    _run(["convert", run_dir, hf_dir, "--overwrite"])

    with open(held_txt, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    srcs, refs = [p["src"] for p in pairs], [p["tgt"] for p in pairs]
    loaded = load(hf_dir)
    greedy = generate(hf_dir, srcs, num_beams=1, max_new_tokens=24, loaded=loaded)
    beam = generate(hf_dir, srcs, num_beams=4, max_new_tokens=24, loaded=loaded)
    for s, r, g, b in list(zip(srcs, refs, greedy, beam))[:5]:
        print(f"  {s!r:50} -> greedy {g!r}  beam {b!r}  (ref {r!r})")

    def norm(x):
        return x.replace(" ", "").strip()
    em_g = sum(norm(g) == r for g, r in zip(greedy, refs)) / len(refs)
    em_b = sum(norm(b) == r for b, r in zip(beam, refs)) / len(refs)
    print(f"demo wall time {time.time() - t0:.0f} s (run folder {run_dir}, model {hf_dir})")
    print(f"exact-match greedy={em_g:.4f} beam={em_b:.4f} n={len(refs)}")
    return 0


if __name__ == "__main__":
    leave(main())
