"""Smoke test of bench/tp_step.py: the tiny model under TP=1 and TP=2 for one step each.

It must run, print both layouts side by side, compute the same loss for the same model (fp32,
no dropout), and find each TP=2 rank holding about half the parameter+gradient+optimizer bytes.
"""
import os
import re
import subprocess
import sys

from conftest import ROOT


def _row(out: str, name: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith(name))
    return re.split(r"\s{2,}", line[len(name):].strip())


def test_tp_step_bench_runs_tiny():
    r = subprocess.run([sys.executable, "bench/tp_step.py", "--config", "configs/test-tiny.yaml", "--vocab", "64",
                        "--precision", "fp32", "--steps", "1", "--warmup", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"^\s+TP=1\s+TP=2\s+TP2/TP1$", out, re.M), out
    loss1, loss2 = _row(out, "loss, first / last step")
    assert loss1 == loss2, out                                   # the same model in both layouts
    tp1, tp2, ratio = _row(out, "param+grad+optim per rank (MiB)")
    assert 0.45 < float(ratio) < 0.6, out                        # sharded weights + replicated norms/biases
    assert float(_row(out, "step time, median (s)")[0]) > 0


def test_tp_step_bench_bad_tp():
    r = subprocess.run([sys.executable, "bench/tp_step.py", "--config", "configs/test-tiny.yaml", "--tp", "1,3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "'model.n_heads': 4 heads do not split over parallel.tp=3" in r.stderr.strip().splitlines()[-1]
