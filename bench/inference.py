"""`encdec eval` and `encdec generate` speed, fp32 vs bf16, on this machine's device.

    python bench/inference.py [--config configs/demo.yaml] [--pairs 4000] [--device auto] [--work DIR]
                              [--batch-size 32] [overrides ...]

1. Writes the demo's synthetic pairs (English number words -> Chinese numerals), prepares them
   (tokenizer from the first `--pairs` pairs, held-out pairs as DATA), trains ONE step of the
   config on one rank (`encdec train`, real DeepSpeed) and converts it (`encdec convert`): a real
   exported folder with its encdec_config.yaml.
2. Times, in this process after a warm-up pass of each precision, `encdec eval` (loss over DATA, then greedy generation
   of every DATA source) and `encdec generate` of the same sources from a file, once per
   precision (--dtype fp32, bf16), and prints them side by side with the bf16 loss's difference
   and the share of generations equal to fp32's. A one-step model rarely stops early, so
   generation runs to --max-new-tokens: a worst case.

On a GPU, `--config configs/transformer-base.yaml` is the 60M model of the issue: compare with the
fp32 one-batch-at-a-time path (about 85 s for 1.1M tokens on an H200 before this change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"encdec {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def setup(a) -> tuple[str, str, str]:
    from data.synthetic import write_corpus
    corpus, hf = os.path.join(a.work, "corpus"), os.path.join(a.work, "hf")
    train, held = write_corpus(corpus, n_heldout=a.pairs)
    if not os.path.isfile(os.path.join(a.work, "valid", "manifest.json")):
        _cli("prepare", train, "--out", os.path.join(a.work, "train"), "--objective", "pairs", "--vocab-size", "600",
             "--overwrite", "--quiet")
        _cli("prepare", held, "--out", os.path.join(a.work, "valid"), "--objective", "pairs", "--tokenizer",
             os.path.join(a.work, "train"), "--overwrite", "--quiet")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        _cli("train", a.config, f"out_dir={a.work}/run", f"data.train={a.work}/train", "data.valid=",
             "train.steps=1", "checkpoint.every=0", "checkpoint.resume=never", "wandb.mode=disabled", *a.overrides)
        _cli("convert", f"{a.work}/run", hf, "--overwrite")
    sources = os.path.join(a.work, "sources.txt")
    with open(held, encoding="utf-8") as f, open(sources, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.loads(line)["src"] + "\n")
    return hf, os.path.join(a.work, "valid"), sources


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--work", default="/tmp/encdec-bench-inference")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    hf, data, sources = setup(a)
    from launcher.cli import main as cli
    from launcher.hf.evaluate import evaluate_folder
    from launcher.hf.generate import load
    rows, outs = {}, {}
    for prec in ("fp32", "bf16", "fp32", "bf16"):      # the first pass of each warms up (kernels, caches)
        m = load(hf, a.device, prec)
        if m.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = evaluate_folder(hf, data, batch_size=a.batch_size, max_generate=a.pairs,
                              max_new_tokens=a.max_new_tokens, loaded=m)
        t1 = time.perf_counter()
        out = os.path.join(a.work, f"generated-{prec}.txt")
        assert cli(["generate", hf, "--input", sources, "--output", out, "--batch-size", str(a.batch_size),
                    "--max-new-tokens", str(a.max_new_tokens), "--device", m.device, "--dtype", prec, "--quiet"]) == 0
        t2 = time.perf_counter()
        rows[prec] = (m.device, res, t1 - t0, t2 - t1)
        outs[prec] = open(out, encoding="utf-8").read().split("\n")
    base = rows["fp32"][1]
    print(f"{a.config}: {base['examples']} examples, {base['target_tokens']} target tokens, batch {a.batch_size}")
    print(f"{'precision':9s} {'device':7s} {'eval s':>8s} {'generate s':>10s} {'examples/s':>10s} {'loss':>10s} "
          f"{'loss - fp32':>12s} {'same text':>9s}")
    figures = {}
    for prec, (dev, res, te, tg) in rows.items():
        same = sum(x == y for x, y in zip(outs[prec], outs["fp32"])) / max(len(outs["fp32"]), 1)
        print(f"{prec:9s} {dev:7s} {te:8.2f} {tg:10.2f} {res['examples'] / te:10.1f} {res['loss']:10.5f} "
              f"{res['loss'] - base['loss']:12.2e} {same:9.4f}")
        figures[prec] = {"device": dev, "eval_s": te, "generate_s": tg, "examples_per_s": res["examples"] / te,
                         "target_tokens_per_s": res["target_tokens"] / te, "loss": res["loss"], "same_text": same}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"config": a.config, "examples": base["examples"], "figures": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
