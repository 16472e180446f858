"""Atomic and tidy checkpoints: a save killed with SIGKILL (kill -9) at any point leaves the previous
checkpoint as the resume point, and the resumed run continues bitwise as the uninterrupted one.

Two ranks (dp=2, ZeRO-2, dropout on); a straight 4-step run is the reference. Each scenario runs
the same job with a checkpoint every 2 steps and kills one rank during the save of step 4; the
other rank dies with it (or is killed, as a scheduler would). Then the job is started again.
"""
import os

import pytest
from ckpt_helpers import metrics, run_ranks, run_ranks_killed, train

N = 4
COMMON = (f"train.steps={N}", "checkpoint.every=2", "checkpoint.keep=2", "parallel.zero_stage=2",
          "model.dropout=0.1", "train.collective_timeout_s=60")


def _run(data, out):
    t = train(data, out, *COMMON)
    return {"step": t.step, "losses": {s: r["loss"] for s, r in metrics(out).items()}}


@pytest.fixture(scope="module")
def reference(tiny_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic_ref")
    return run_ranks(2, _run, tiny_pairs["train"], str(tmp / "ref"), tmp=str(tmp))


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["0:ds-file", "1:files-written", "0:before-rename", "0:before-latest"])
def test_kill_9_during_save_resumes_from_previous(tiny_pairs, tmp_path, reference, kill):
    data, ref = tiny_pairs["train"], reference
    run = tmp_path / "run"
    codes = run_ranks_killed(2, _run, data, str(run), env={"ENCDEC_CKPT_KILL": f"{kill}:step00000004"},
                             tmp=str(tmp_path))
    victim = int(kill[0])
    assert codes[victim] == -9, codes                        # really killed by SIGKILL
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000002"
    assert (root / "step00000002" / "trainer_state.json").is_file()
    if kill == "0:before-latest":                           # complete but never published
        assert (root / "step00000004" / "trainer_state.json").is_file()
    else:
        assert not (root / "step00000004").exists()
        assert (root / "step00000004.partial").is_dir()
        assert not (root / "step00000004.partial" / "trainer_state.json").exists() or kill == "0:before-rename"

    res = run_ranks(2, _run, data, str(run), tmp=str(tmp_path))
    assert res["step"] == N
    for s in (3, 4):                                         # resumed at 2: steps 3, 4 as the straight run
        assert res["losses"][str(s)] == ref["losses"][str(s)], (s, res["losses"], ref["losses"])
    assert (root / "latest").read_text().strip() == "step00000004"
    assert sorted(os.listdir(root)) == ["latest", "step00000002", "step00000004"]   # partial gone, keep=2
