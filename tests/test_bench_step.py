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


def test_step_bench_reports_precision_host_reads_and_the_planner(tmp_path):
    """The figures bench/gpu_check.py tabulates, on the tiny config: one trainer per ZeRO stage, the
    first step's matmul dtypes, host reads per step, the planner's prediction beside the measurement."""
    import json
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "bench/step.py", "--config", "configs/test-tiny.yaml", "--vocab", "60",
                        "--precision", "bf16", "--steps", "2", "--warmup", "1", "--zeros", "1,3", "--skip-hf",
                        "--plan", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["contenders"]) == {"trainer-z1", "trainer-z3", "bare"}
    assert res["precision_check"] and all(d == ["bfloat16"] for d in res["precision_check"].values())
    for n in ("trainer-z1", "trainer-z3"):
        assert res["host_reads_per_step"][n]["project"] == 1, res["host_reads_per_step"]
        assert res["predicted"][n]["peak_bytes"] > 0 and res["predicted"][n]["step_s"] > 0
    assert res["calibration"]["micro"] == 4 and res["calibration"]["adam_s_per_param"] > 0
    assert "trainer-z1 overhead over the bare loop" in r.stdout
