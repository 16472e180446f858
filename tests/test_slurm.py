"""slurm/train.sbatch on a real two-node Slurm cluster (scripts/slurm_cluster.sh, real daemons).

Proves: rank/world/local rank reach the tasks from Slurm across nodes; a 2-node training job
completes and checkpoints; USR1 checkpoints, requeues and resumes to the same final loss (and
the same wandb run) as an uninterrupted job; a dead rank ends the job quickly.
Skipped only where Slurm cannot be installed (not root, or no apt-get).
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import read_metrics, run_cli
from tests.slurm_helpers import (CPU_ARGS, ROOT, SharedCluster, cannot_run_reason, job_info, read_text,
                                 sbatch, wait_for, wait_job)

pytestmark = pytest.mark.slurm
JOB_TIMEOUT = 300          # seconds; a tiny 2-rank trainer job takes ~20-40 s on 2 loaded cores


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = cannot_run_reason()
    if reason:
        pytest.skip(reason)
    cluster = SharedCluster()
    msg = cluster.start()
    print(f"\n{msg}; slurm_cluster.sh start took {cluster.start_s:.1f} s")
    yield cluster
    cluster.release()


def _env(tmp, run_dir, **extra) -> dict:
    return {"ENCDEC_HOME": ROOT, "ENCDEC_CONFIG": "configs/test-tiny.yaml", "ENCDEC_RUN_DIR": str(run_dir),
            "ENCDEC_GPUS_PER_NODE": "0", "OMP_NUM_THREADS": "1", **extra}


def _payload_python(tmp) -> str:
    """ENCDEC_PYTHON for the payload: a wrapper that runs tests/slurm_payload.py with this interpreter."""
    path = os.path.join(tmp, "payload-python")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT}/tests/slurm_payload.py" "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def _payload_lines(log: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("PAYLOAD {")]


@pytest.mark.parametrize("nodes,tasks", [(2, 1), (2, 2)])
def test_ranks_from_slurm_across_nodes(slurm_cluster, tmp_path, nodes, tasks):
    run_dir = tmp_path / "run"
    env = _env(tmp_path, run_dir, ENCDEC_PYTHON=_payload_python(tmp_path),
               ENCDEC_OVERRIDES="train.steps=7 optim.lr=1e-3")
    t0 = time.monotonic()
    job = sbatch([*CPU_ARGS, f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
                  f"--output={tmp_path}/%j.out"], env)
    info = wait_job(job, 120)
    log = read_text(f"{tmp_path}/{job}.out")
    print(f"job {job} ({nodes}x{tasks}): {time.monotonic() - t0:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    out = sorted(_payload_lines(log), key=lambda d: d["rank"])
    world = nodes * tasks
    assert [d["rank"] for d in out] == list(range(world)), log
    for d in out:
        assert d["world"] == world and d["sum"] == world * (world + 1) / 2
        assert d["node"] == d["rank"] // tasks and d["local_rank"] == d["rank"] % tasks
        assert d["nodename"] == f"node{d['node'] + 1}"
        assert d["master"] == f"node1:{20000 + int(job) % 10000}"
        assert d["argv"] == ["-m", "launcher.cli", "train", "configs/test-tiny.yaml", f"out_dir={run_dir}",
                             "train.steps=7", "optim.lr=1e-3"]


def test_dead_rank_ends_job_fast(slurm_cluster, tmp_path):
    """SIGKILL one rank (as the OOM killer would): the peer blocked in all_reduce must not hang the job."""
    env = _env(tmp_path, tmp_path / "run", ENCDEC_PYTHON=_payload_python(tmp_path), PAYLOAD_LOOP="1")
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"], env)
    log_path = f"{tmp_path}/{job}.out"
    line = wait_for(lambda: next((ln for ln in read_text(log_path).splitlines()
                                  if ln.startswith("PAYLOAD_LOOP rank 1 pid")), None), 120, "rank 1 to start")
    os.kill(int(line.split()[-1]), signal.SIGKILL)
    t_kill = time.monotonic()
    info = wait_job(job, 120)
    print(f"job {job}: ended {time.monotonic() - t_kill:.1f} s after rank 1 was killed")
    assert info["JobState"] == "FAILED", read_text(log_path)
    assert time.monotonic() - t_kill < 60


# ----------------------------------------------------------------------------- the real trainer

STEPS = 40


@pytest.fixture(scope="module")
def shards(tiny_pairs):
    return tiny_pairs["train"]


@pytest.fixture(scope="module")
def single_process_losses(shards, tmp_path_factory):
    """The same training in one plain process: what the 2-node job must reproduce."""
    out = tmp_path_factory.mktemp("slurm-single")
    r = run_cli(["train", "configs/test-tiny.yaml", *_overrides(shards), f"out_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return {row["step"]: row["loss"] for row in read_metrics(str(out))}


def _overrides(shards, steps=STEPS) -> list[str]:
    return [f"data.train={shards}", f"train.steps={steps}", "checkpoint.every=0"]


def _train_env(tmp, run_dir, shards, steps=STEPS, **extra):
    return _env(tmp, run_dir, ENCDEC_PYTHON=sys.executable, ENCDEC_OVERRIDES=" ".join(_overrides(shards, steps)),
                **extra)


def _train_rows(run_dir) -> dict:
    rows = [json.loads(line) for line in read_text(os.path.join(run_dir, "metrics.jsonl")).splitlines()]
    return {r["step"]: r for r in rows if r.get("kind") == "train"}   # a resumed run rewrites its steps


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, shards, tmp_path_factory):
    """An uninterrupted 2-node x 1-task training job, submitted once and shared (it runs alongside others)."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    run_dir = tmp / "run"
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp}/%j.out"],
                 _train_env(tmp, run_dir, shards))
    return {"job": job, "run_dir": str(run_dir), "log": f"{tmp}/{job}.out", "t0": time.monotonic()}


def _finished(ref) -> dict:
    info = wait_job(ref["job"], JOB_TIMEOUT)
    ref.setdefault("wall", time.monotonic() - ref["t0"])
    return info


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(reference_job, shards, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"],
                 _train_env(tmp_path, run_dir, shards, WANDB_MODE="offline"))
    log_path = f"{tmp_path}/{job}.out"
    # the time-limit warning, sent by hand once training runs: to the batch shell, as --signal=B:USR1 does
    wait_for(lambda: len(_train_rows(run_dir)) >= 3 or job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
             JOB_TIMEOUT, "training to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    # a requeued job waits ~120 s (BeginTime) before it may start again: start it now
    wait_job(job, JOB_TIMEOUT, until=lambda i: int(i.get("Restarts", 0)) >= 1 and i["JobState"] == "PENDING"
             or i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"))
    # slurmd refuses a credential created in the same second as the revoke of the previous run
    # ("Job credential revoked": it compares whole seconds), which is what the BeginTime delay
    # guards against; 2 s are enough for the emulated nodes
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], timeout=30)
    info = wait_job(job, JOB_TIMEOUT)
    log = read_text(log_path)
    print(f"job {job}: {time.monotonic() - t0:.1f} s with the requeue")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log[-3000:]
    stopped = [ln for ln in log.splitlines() if ln.startswith("stopped by signal at step")]
    assert len(stopped) == 1, log[-3000:]
    k = int(stopped[0].split()[5].rstrip(";"))
    assert 3 <= k < STEPS
    assert f"at step {k}" in next(ln for ln in log.splitlines() if ln.startswith("resumed from")), log[-3000:]
    # the same wandb run continues: one id in the run folder, both offline runs carry it
    rid = read_text(os.path.join(run_dir, "wandb_run_id")).strip()
    runs = sorted(os.listdir(os.path.join(run_dir, "wandb")))
    offline = [r for r in runs if r.startswith("offline-run-")]
    assert len(offline) == 2 and all(r.endswith("-" + rid) for r in offline), runs

    ref_info = _finished(reference_job)
    assert ref_info["JobState"] == "COMPLETED", read_text(reference_job["log"])[-3000:]
    ref, got = _train_rows(reference_job["run_dir"]), _train_rows(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in (k, k + 1, STEPS):   # the step it stopped at, the first after the resume, the last
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-7), s


@pytest.mark.slow
def test_train_two_nodes_completes_and_checkpoints(reference_job, single_process_losses):
    info = _finished(reference_job)
    log, run_dir = read_text(reference_job["log"]), reference_job["run_dir"]
    print(f"job {reference_job['job']}: {reference_job['wall']:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    ckpts = os.path.join(run_dir, "checkpoints")
    assert read_text(os.path.join(ckpts, "latest")).strip() == f"step{STEPS:08d}"
    assert os.path.isfile(os.path.join(ckpts, f"step{STEPS:08d}", "trainer_state.json"))
    rows = _train_rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    # two ranks, one per node (tokens_per_s_per_device = tokens_per_s / world), and the same
    # training as one process on the same global batches
    assert rows[STEPS]["tokens_per_s"] / rows[STEPS]["tokens_per_s_per_device"] == pytest.approx(2.0)
    for s in rows:
        assert rows[s]["loss"] == pytest.approx(single_process_losses[s], rel=1e-5, abs=1e-6), s


@pytest.mark.slow
def test_trainer_rank_dies_job_fails_fast(slurm_cluster, shards, tmp_path):
    """ENCDEC_FAULT=1:3 makes rank 1 exit(17) before step 4; rank 0 waits in a collective meanwhile.
    The script restarts the step once (a crash may be a flaky node), sees the same failure with no
    new checkpoint and gives up (status 4) instead of looping."""
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"],
                 _train_env(tmp_path, tmp_path / "run", shards, ENCDEC_FAULT="1:3"))
    log_path = f"{tmp_path}/{job}.out"
    wait_for(lambda: "ENCDEC_FAULT: rank 1" in read_text(log_path), JOB_TIMEOUT, "the injected fault")
    t_fault = time.monotonic()
    info = wait_job(job, 150)
    took = time.monotonic() - t_fault
    print(f"job {job}: ended {took:.1f} s after the fault")
    log = read_text(log_path)
    assert info["JobState"] == "FAILED" and info["ExitCode"].split(":")[0] == "4", log[-3000:]
    assert log.count("restart 1/") == 1 and "restart 2/" not in log, log[-3000:]
    assert "giving up: a rank exited with status 17 again" in log, log[-3000:]
    assert took < 120


@pytest.mark.slow
def test_scancel_saves_a_checkpoint_and_is_not_requeued(slurm_cluster, shards, tmp_path):
    """TERM (scancel) reaches the ranks: they save, but only the USR1 warning may requeue the job."""
    run_dir = tmp_path / "run"
    env = _train_env(tmp_path, run_dir, shards, steps=500)
    job = sbatch([*CPU_ARGS, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"], env)
    log_path = f"{tmp_path}/{job}.out"
    wait_for(lambda: len(_train_rows(run_dir)) >= 3 or job_info(job).get("JobState") not in ("PENDING", "RUNNING"),
             JOB_TIMEOUT, "training to start")
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_for(lambda: "srun exited" in read_text(log_path), 60, "the batch script to finish")
    time.sleep(1)                       # a requeue issued by the script would show by now
    info = job_info(job)
    log = read_text(log_path)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log[-3000:]
    assert "got SIGTERM" in log and "not requeueing" in log, log[-3000:]
    stopped = [ln for ln in log.splitlines() if ln.startswith("stopped by signal at step")]
    assert len(stopped) == 1, log[-3000:]
    k = int(stopped[0].split()[5].rstrip(";"))
    assert read_text(os.path.join(run_dir, "checkpoints", "latest")).strip() == f"step{k:08d}"
