"""Export time and peak memory for the transformer-base config (configs/transformer-base.yaml, ~61M params).

    python bench/export_memory.py [--workdir DIR] [--zero 2 3]

1. Makes a random corpus and a 32k-token tokenizer (encdec prepare), then trains ONE step of
   transformer-base on 2 CPU ranks (`encdec train --nproc 2`, real DeepSpeed engines) at each ZeRO
   stage asked for: a real checkpoint with weights, Adam state and all.
2. Exports each checkpoint in a fresh process and reports wall time and peak RSS (ru_maxrss, which
   counts the memory-mapped file pages touched too), side by side with
     - the imports alone (python + torch + deepspeed + transformers), and
     - the previous path: DeepSpeed's zero_to_fp32 consolidation + to_hf_state_dict + save_file.
Sizes for scale: the fp32 weights, and the checkpoint on disk (weights + Adam state + grads-free).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_MEASURE = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
import torch, deepspeed, transformers  # noqa: F401  (the same imports in every variant)
from launcher.hf import export as C
mode, ckpt, out = sys.argv[1:4]
peak = {{"RssAnon": 0, "RssFile": 0}}
def _sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                k = line.split(":")[0]
                if k in peak:
                    peak[k] = max(peak[k], int(line.split()[1]))
        time.sleep(0.002)
threading.Thread(target=_sample, daemon=True).start()
time.sleep(0.05)
t = time.perf_counter()
if mode == "ours":
    C.convert(ckpt, out, overwrite=True, verify=False, progress=False)
elif mode == "ours-verify":
    C.convert(ckpt, out, overwrite=True, verify=True, progress=False)
elif mode == "zero_to_fp32":
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    from model import arch_of
    from launcher.config import config_from_dict
    root, tag = C.resolve_checkpoint(ckpt)
    cfg = config_from_dict(C.load_trainer_state(root, tag)["config"])
    sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    sd = {{k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in sd.items()}}
    os.makedirs(out, exist_ok=True)
    save_file(arch_of(cfg.model).hf.to_hf_state_dict(sd, cfg.model), os.path.join(out, "model.safetensors"))
dt = time.perf_counter() - t
time.sleep(0.05)
print(json.dumps({{"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": peak["RssAnon"] / 1024, "peak_file_mb": peak["RssFile"] / 1024}}))
"""


def _corpus(path: str, n: int = 20000, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(60000)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"src": " ".join(rng.choices(words, k=20)), "tgt": " ".join(rng.choices(words, k=12))})
                    + "\n")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def _measure(mode: str, ckpt: str, out: str) -> dict:
    code = _MEASURE.format(root=ROOT)
    if mode == "imports":
        code = code.split("t = time.perf_counter()")[0] + "dt = 0.0\n" + code.split("dt = time.perf_counter() - t")[1]
    r = _run([sys.executable, "-c", code, mode, ckpt, out])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _du(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="")
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="encdec-export-bench-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    if not os.path.isdir(data):
        _corpus(os.path.join(work, "corpus.jsonl"))
        _run([sys.executable, "-m", "launcher.cli", "prepare", os.path.join(work, "corpus.jsonl"), "--out", data,
              "--objective", "pairs", "--vocab-size", "32000", "--quiet"])
    from launcher.config import model_config_from_dict
    from model import count_parameters
    rows = []
    for z in a.zero:
        run = os.path.join(work, f"run-zero{z}")
        if not os.path.isdir(os.path.join(run, "checkpoints")):
            _run([sys.executable, "-m", "launcher.cli", "train", "configs/transformer-base.yaml", f"data.train={data}",
                  f"out_dir={run}", "train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
                  "data.max_src_len=32", "data.max_tgt_len=32", "data.objective=pairs", "data.num_workers=0",
                  "train.precision=fp32", f"parallel.zero_stage={z}", "--nproc", "2"], timeout=1800)
        with open(os.path.join(run, "checkpoints", "latest")) as f:
            tag_dir = os.path.join(run, "checkpoints", f.read().strip())
        with open(os.path.join(tag_dir, "trainer_state.json")) as f:
            mc = model_config_from_dict(json.load(f)["config"]["model"])
        res = {m: _measure(m, run, os.path.join(work, f"hf-{m}-z{z}"))
               for m in ("imports", "ours", "ours-verify", "zero_to_fp32")}
        rows.append((z, count_parameters(mc), _du(tag_dir), res))
    print("\nexport of transformer-base (2 ranks, 1 step), each in a fresh process. Peak memory in MB:\n"
          "RSS = ru_maxrss (includes the imports and memory-mapped file pages read), anon = peak anonymous\n"
          "memory (what the process allocates), file = peak mapped file pages (page cache, reclaimable).")
    print(f"{'ZeRO':>4} {'params':>7} {'fp32':>6} {'ckpt':>6} | {'variant':<13} {'seconds':>7} {'RSS':>6} "
          f"{'anon':>6} {'file':>6}")
    for z, n, ck, r in rows:
        for i, (m, v) in enumerate(r.items()):
            head = f"{z:>4} {n / 1e6:>6.1f}M {n * 4 / 2 ** 20:>6.0f} {ck:>6.0f}" if i == 0 else " " * 26
            print(f"{head} | {m:<13} {v['seconds']:>7.2f} {v['peak_rss_mb']:>6.0f} {v['peak_anon_mb']:>6.0f} "
                  f"{v['peak_file_mb']:>6.0f}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
