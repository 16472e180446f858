"""A chaos soak on the real local Slurm cluster (2 nodes x 1 rank, loader workers 1, dropout 0.1,
ZeRO 2): one job receives, in turn, USR1 (the time-limit warning: checkpoint, requeue), TERM to
the step (checkpoint, resumed in the allocation), kill -9 of one rank (in-job restart from the
latest checkpoint), SIGSTOP of one rank (the peer's watchdog names it and exits; restart), and a
poisoned batch (skipped on every rank). It must end COMPLETED with the final parameters equal to
an uninterrupted run that skips the same step, and one wandb run (offline).
Prints, per fault, how long detection and recovery took and how many steps were replayed.
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from ckpt_helpers import consolidated
from tests.slurm_helpers import CPU_ARGS, ROOT, job_info, read_text, sbatch, slurm_env, wait_for, wait_job
from tests.test_slurm import slurm_cluster  # noqa: F401 - the shared cluster fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.chaos]
STEPS, POISON = 120, 100       # the poisoned batch: rank 1's at step index 100 (logged as step 101)
# The job sleeps this long before each step (numerics unchanged) so that every fault lands while it
# still trains, however fast or loaded the machine; the reference runs at full speed.
PACE_S = "0.4"


def _overrides(data):
    return [f"data.train={data}", f"train.steps={STEPS}", "checkpoint.every=10", "checkpoint.keep=3",
            "data.num_workers=1", "model.dropout=0.1", "parallel.zero_stage=2", "train.hang_timeout_s=8",
            "train.global_batch_size=64"]


def _latest_step(run_dir) -> int:
    tag = read_text(os.path.join(run_dir, "checkpoints", "latest")).strip()
    return int(tag[4:]) if tag.startswith("step") else 0


def _max_step(run_dir) -> int:
    steps = [json.loads(ln)["step"] for ln in read_text(os.path.join(run_dir, "metrics.jsonl")).splitlines()
             if '"kind": "train"' in ln]
    return max(steps, default=0)


def _rank_main(job: str, rank: int) -> psutil.Process | None:
    """The Python main process of a rank of the job: `python -m launcher.cli train` whose parent is
    the task's shell (train.sbatch's rank wrapper, whose own command line names launcher.cli too);
    loader workers are its children."""
    for p in psutil.process_iter(["name"]):
        try:
            cmd = p.cmdline()
            if cmd[1:3] != ["-m", "launcher.cli"] or p.parent().name() != "bash":
                continue
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return None


def test_chaos_soak_ends_completed_and_equal(slurm_cluster, tiny_pairs, tmp_path):  # noqa: F811
    data = tiny_pairs["train"]
    # the reference: uninterrupted, the same poisoned step skipped, same layout (2 gloo ranks)
    ref = tmp_path / "ref"
    r = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", "configs/test-tiny.yaml", *_overrides(data),
                          f"out_dir={ref}", "--nproc", "2"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, "ENCDEC_FAULT_NAN": f"1:{POISON}"})
    run = tmp_path / "run"
    env = {"ENCDEC_HOME": ROOT, "ENCDEC_CONFIG": "configs/test-tiny.yaml", "ENCDEC_RUN_DIR": str(run),
           "ENCDEC_GPUS_PER_NODE": "0", "OMP_NUM_THREADS": "1", "ENCDEC_PYTHON": sys.executable,
           "ENCDEC_OVERRIDES": " ".join(_overrides(data)), "WANDB_MODE": "offline", "ENCDEC_MAX_FAILURES": "5",
           "ENCDEC_RESTART_DELAY": "1", "ENCDEC_FAULT_NAN": f"1:{POISON}",
           "ENCDEC_FAULT_STEP_DELAY": PACE_S}
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"], env)
    log_path = f"{tmp_path}/{job}.out"
    report = {}

    def progress_past(step, what, timeout=240):
        wait_for(lambda: _max_step(run) >= step or job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
                 timeout, what)
        assert job_info(job).get("JobState") in ("PENDING", "RUNNING"), read_text(log_path)[-3000:]
        return _max_step(run)

    def log_has(text, n=1):
        return read_text(log_path).count(text) >= n

    # 1. USR1 to the batch script: checkpoint, requeue (started at once instead of after ~120 s)
    at = progress_past(5, "training to start")
    t0 = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30, env=slurm_env())
    wait_job(job, 240, until=lambda i: int(i.get("Restarts", 0)) >= 1 and i["JobState"] == "PENDING")
    t_detect = time.monotonic() - t0
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], timeout=30, env=slurm_env())
    at2 = progress_past(at + 3, "the requeued job to train")
    report["USR1"] = (t_detect, time.monotonic() - t0, "stop step kept")
    # 2. TERM to every process of the step (not the batch script): checkpoint, resumed in the allocation
    t0 = time.monotonic()
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30, env=slurm_env())
    wait_for(lambda: log_has("resuming in this allocation"), 120, "the TERM checkpoint")
    t_detect = time.monotonic() - t0
    at3 = progress_past(at2 + 6, "training after TERM")
    report["TERM to the step"] = (t_detect, time.monotonic() - t0, "stop step kept")
    # 3. kill -9 of rank 1: the step ends, the script restarts it from the latest checkpoint
    victim = wait_for(lambda: _rank_main(job, 1), 60, "rank 1")
    before, saved = _max_step(run), _latest_step(run)
    t0 = time.monotonic()
    victim.kill()
    wait_for(lambda: log_has("restart 1/5"), 120, "the restart after kill -9")
    t_detect = time.monotonic() - t0
    at4 = progress_past(max(at3, before) + 6, "training after kill -9")
    report["kill -9"] = (t_detect, time.monotonic() - t0, before - saved)
    # 4. SIGSTOP of rank 1: rank 0's watchdog names it (hang_timeout_s=8) and exits; restart
    victim = wait_for(lambda: _rank_main(job, 1), 60, "rank 1")
    before, saved = _max_step(run), _latest_step(run)
    t0 = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    wait_for(lambda: log_has("encdec: hang: rank 0"), 120, "the watchdog")
    t_detect = time.monotonic() - t0
    wait_for(lambda: log_has("restart 2/5"), 120, "the restart after the hang")
    progress_past(max(at4, before) + 3, "training after the hang")
    report["SIGSTOP"] = (t_detect, time.monotonic() - t0, before - saved)
    info = wait_job(job, 400)
    log = read_text(log_path)
    out_ref, _ = r.communicate(timeout=400)
    for k, (det, rec, lost) in report.items():
        print(f"chaos {k}: detected after {det:.1f} s, training again after {rec:.1f} s, steps replayed: {lost}")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert r.returncode == 0, out_ref[-3000:]
    hang = [ln for ln in log.splitlines() if ln.startswith("encdec: hang: rank 0")]
    assert hang and "rank 1: step" in hang[0] and "silent" in hang[0], hang
    # 5. the poisoned batch: skipped on every rank, once, in both runs
    assert f"step {POISON + 1} skipped" in log, log[-4000:]
    rows = {json.loads(ln)["step"]: json.loads(ln) for ln in read_text(os.path.join(run, "metrics.jsonl")).splitlines()
            if '"kind": "train"' in ln}
    assert rows[STEPS]["skipped_steps"] == 1 and rows[POISON + 1]["loss"] is None
    want, got = consolidated(ref)[1], consolidated(run)[1]
    diff = [n for n in want if not torch.equal(want[n], got[n])]
    assert not diff, diff[:5]
    # one wandb run: every attempt's offline folder carries the run folder's id
    rid = read_text(os.path.join(run, "wandb_run_id")).strip()
    offline = [d for d in os.listdir(run / "wandb") if d.startswith("offline-run-")]
    assert rid and len(offline) >= 4 and all(d.endswith("-" + rid) for d in offline), offline
