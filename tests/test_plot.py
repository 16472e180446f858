"""plot(): PNG curves from a metrics.jsonl written by the real Monitor; clear errors."""
import json
import os

import pytest

from launcher.monitor import plot as plot_mod
from launcher.config import RunConfig
from launcher.monitor.metrics import Monitor

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = RunConfig()
    cfg.train.steps = 60
    with Monitor(cfg, str(run_dir), is_rank0=True, console=False) as m:
        for step in range(10, 50, 10):
            m.log(step, {"loss": 6.0 - step / 10, "lr": 1e-5 * step, "tokens_per_s": 1000.0 + step, "mfu": 0.3})
        m.log_eval(40, {"loss": 2.5, "ppl": 12.2})
    # A requeued job resumed from step 20 and logs 30..60 again: the later rows win.
    with Monitor(cfg, str(run_dir), is_rank0=True, console=False) as m:
        for step in range(30, 70, 10):
            m.log(step, {"loss": 1.0, "lr": 2e-4, "tokens_per_s": 900.0, "mfu": None})
        m.log_eval(60, {"loss": 0.9})


def test_plot_writes_pngs(tmp_path, monkeypatch):
    run_dir = tmp_path / "myrun"
    write_run(run_dir, monkeypatch)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 70, "lo')          # torn last line (crash mid-write)
    train, evals = plot_mod.read_metrics(str(run_dir))
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert [r["loss"] for r in train] == [5.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    assert [r["step"] for r in evals] == [40, 60]
    paths = plot_mod.plot(str(run_dir))
    assert [os.path.basename(p) for p in paths] == ["loss.png", "throughput.png", "lr.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert len(data) > 1000 and data.startswith(PNG), p
        assert os.path.dirname(p) == str(run_dir / "plots")
    assert sorted(os.listdir(run_dir / "plots")) == ["loss.png", "lr.png", "throughput.png"]   # no temp files


def test_plot_errors(tmp_path):
    with pytest.raises(plot_mod.PlotError, match="run folder not found: .*nope"):
        plot_mod.plot(str(tmp_path / "nope"))
    with pytest.raises(plot_mod.PlotError, match=r"metrics.jsonl: not found"):
        plot_mod.plot(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(plot_mod.PlotError, match=r"metrics.jsonl: empty"):
        plot_mod.plot(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1}\nnot json\n{"kind": "eval", "step": 1}\n')
    with pytest.raises(plot_mod.PlotError, match=r"metrics.jsonl:2: not a JSON object"):
        plot_mod.plot(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": "3"}) + "\n")
    with pytest.raises(plot_mod.PlotError, match=r"metrics.jsonl:1: expected an object with \"kind\""):
        plot_mod.plot(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 3, "grad_norm": 1.0}) + "\n")
    with pytest.raises(plot_mod.PlotError, match="no loss, tokens_per_s or lr values"):
        plot_mod.plot(str(tmp_path))
    assert issubclass(plot_mod.PlotError, ValueError)       # the CLI prints ValueErrors as one line
