"""Monitoring through the real trainer: 2 ranks under ZeRO-3 with evaluation in the loop (loss,
perplexity, greedy generation scored with BLEU/chrF) logging offline to wandb; a resumed run
continues the same wandb run; `encdec plot` draws the curves from metrics.jsonl."""
import glob
import os

import pytest

from tests.conftest import read_metrics, run_cli
from tests.test_monitor import history_and_config

TRAIN_KEYS = ["loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s",
              "step_time_s", "data_wait_frac", "peak_mem_gb", "skipped_samples", "pad_frac"]


@pytest.mark.slow
def test_zero3_run_with_eval_logs_to_wandb_and_resumes_the_same_run(tiny_pairs, tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    os.makedirs(tmp_path / "wandb")
    common = ["train", "configs/test-tiny.yaml", f"data.train={tiny_pairs['train']}",
              f"data.valid={tiny_pairs['valid']}", f"out_dir={run}", "parallel.zero_stage=3",
              "train.eval_every=2", "train.log_every=1", "checkpoint.every=2", "--nproc", "2"]
    r = run_cli(common + ["train.steps=2"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text().strip()
    r = run_cli(common + ["train.steps=4"], env=env)            # resumes from step 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and (run / "wandb_run_id").read_text().strip() == run_id

    train, evals = read_metrics(run), read_metrics(run, "eval")
    assert [row["step"] for row in train] == [1, 2, 3, 4]
    assert all(k in train[-1] for k in TRAIN_KEYS)
    assert [row["step"] for row in evals] == [2, 4]
    assert all({"loss", "ppl", "bleu", "chrf"} <= set(row) for row in evals)

    files = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    steps, keys = set(), set()
    for f in files:
        rows, _config, _rid = history_and_config(f)
        for row in rows:
            keys |= set(row)
            if "train/loss" in row:
                steps.add(row["step"])
    assert steps == {1, 2, 3, 4}
    assert {f"train/{k}" for k in TRAIN_KEYS} | {"eval/loss", "eval/bleu", "eval/chrf"} <= keys

    r = run_cli(["plot", str(run)])
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = [p for p in r.stdout.split() if p.endswith(".png")]
    assert pngs and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)
