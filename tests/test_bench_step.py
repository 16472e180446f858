"""Smoke test of bench/step.py on the tiny config: it runs, prints the three contenders, and the
trainer's engine and the bare loop compute the same first loss on the same batch (fp32)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_step_bench_runs_tiny():
    r = subprocess.run([sys.executable, "bench/step.py", "--config", "configs/test-tiny.yaml", "--vocab", "60",
                        "--precision", "fp32", "--steps", "1", "--warmup", "0", "model.dropout=0.0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    losses = dict(re.findall(r"(\w+) (\d+\.\d+)", out.split("first-step loss:")[1].splitlines()[0]))
    assert losses["trainer"] == losses["bare"], out
    assert abs(float(losses["hf"]) - float(losses["trainer"])) < 0.05, out     # the stock class: the same function
    for name in ("trainer", "bare", "hf"):
        assert re.search(rf"^{name}\s+\d+\.\d+", out, re.M), out
    assert "trainer overhead over the bare loop" in out
