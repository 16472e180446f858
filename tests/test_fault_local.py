"""Faults on local runs (`encdec train`, one process or torchrun), in users' conditions.

- TERM and USR1 sent to every process of a rank (main, 2 loader workers, their `pipe:cat`
  commands), as Slurm does: checkpoint at the agreed step, resume, final parameters bitwise equal
  to an uninterrupted run (fp32, ZeRO 2, dropout 0.1).
- Ctrl-C: a checkpoint at the step it stopped, a line saying so, and the same command resumes.
- One run per run folder: a second run on a busy folder is refused naming the owner; after the
  owner is killed (-9) the next run takes over and resumes.
- A hung rank (SIGSTOP) is named by the watchdog of its peer, which exits so the job can restart.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from ckpt_helpers import consolidated
from tests.conftest import ROOT, read_metrics

pytestmark = pytest.mark.slow


def _start(args, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", "configs/test-tiny.yaml", *args],
                            cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run_dir) -> int:
    try:
        return len(read_metrics(str(run_dir)))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(p, timeout=240) -> str:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"did not finish:\n{out[-3000:]}")
    return out


def _ranks(torchrun_cli: subprocess.Popen) -> dict[int, psutil.Process]:
    """rank -> main process of that rank (torchrun's children, by their RANK)."""
    out = {}
    for k in psutil.Process(torchrun_cli.pid).children(recursive=True):
        try:
            env = k.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        try:
            if "RANK" in env and "torch.distributed.run" in " ".join(k.parent().cmdline()):
                out[int(env["RANK"])] = k
        except (psutil.NoSuchProcess, AttributeError):
            pass
    return out


def _pipe_source(prepared: str) -> list[str]:
    n = len(json.load(open(os.path.join(prepared, "manifest.json")))["shards"])
    return [f"data.train=pipe:cat {prepared}/shard-{{000000..{n - 1:06d}}}.tar",
            f"data.tokenizer={prepared}/tokenizer.json"]


def test_term_and_usr1_to_every_process_of_the_ranks(tiny_pairs, tmp_path):
    common = [*_pipe_source(tiny_pairs["train"]), "data.num_workers=2", "model.dropout=0.1",
              "parallel.zero_stage=2", "train.steps=10", "checkpoint.every=0", "--nproc", "2"]
    ref = tmp_path / "straight"
    r = _start([*common, f"out_dir={ref}"])
    run = tmp_path / "stopped"
    p = _start([*common, f"out_dir={run}"])
    _wait(lambda: _rows(run) >= 3 or p.poll() is not None, 240, "training to start")
    ranks = _ranks(p)
    assert sorted(ranks) == [0, 1], ranks
    hit = []
    for rank, sig in ((1, signal.SIGTERM), (0, signal.SIGUSR1)):      # as Slurm: every process of the rank
        procs = [ranks[rank], *ranks[rank].children(recursive=True)]
        for q in procs:
            try:
                q.send_signal(sig)
                hit.append((rank, q.name()))
            except psutil.NoSuchProcess:
                pass
    out = _finish(p)
    assert p.returncode == 0, out[-3000:]
    assert len([h for h in hit if h[0] == 1]) >= 3, hit          # the rank and its two workers at least
    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped by signal at step")]
    assert len(stopped) == 1, out[-3000:]
    k = int(stopped[0].split()[5].rstrip(";"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{k:08d}"
    assert k < 10 and "bad samples" not in out and "DataLoader worker" not in out, out[-3000:]
    out2 = _finish(_start([*common, f"out_dir={run}"]))
    assert f"at step {k}" in out2 and "Traceback" not in out2, out2[-3000:]
    assert _finish(r) and r.returncode == 0
    want, got = consolidated(ref)[1], consolidated(run)[1]
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert all(row["skipped_samples"] == 0 for row in read_metrics(str(run)))


def test_ctrl_c_checkpoints_and_busy_folder_is_refused_then_taken_over(tiny_pairs, tmp_path):
    common = [f"data.train={tiny_pairs['train']}", "checkpoint.every=0", "model.dropout=0.1", "train.steps=100000"]
    run = tmp_path / "run"
    p = _start([*common, f"out_dir={run}"])
    _wait(lambda: _rows(run) >= 3 or p.poll() is not None, 240, "training to start")
    # a second training on the same folder: refused at once, naming the owner
    busy = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "configs/test-tiny.yaml", *common,
                           f"out_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert busy.returncode == 2, busy.stderr[-3000:]
    assert busy.stderr.strip().splitlines()[-1].startswith("encdec: error: run folder") \
        and f"pid {p.pid}" in busy.stderr, busy.stderr[-3000:]
    # Ctrl-C: a checkpoint at the step it stopped
    p.send_signal(signal.SIGINT)
    out = _finish(p)
    assert p.returncode == 0, out[-3000:]
    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped by signal at step")]
    assert len(stopped) == 1 and "SIGINT" in stopped[0], out[-3000:]
    k = int(stopped[0].split()[5].rstrip(";"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{k:08d}"
    assert not (run / "run.lock").exists()                    # a clean stop releases the folder
    # an owner that dies (kill -9) leaves a stale lock: the next run takes over and resumes
    p = _start([*common, "checkpoint.every=2", f"out_dir={run}"])
    _wait(lambda: _rows(run) >= k + 4 or p.poll() is not None, 240, "the resumed run to save")
    p.kill()
    p.communicate()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    # it takes over and resumes; then a double Ctrl-C (the second 1.5 s after the first, while a
    # slow step still runs) leaves at once: status 130, no new checkpoint, the folder unlocked
    p = _start([*common, f"out_dir={run}"], env={"ENCDEC_FAULT_STEP_DELAY": "3"})
    n = _rows(run)
    _wait(lambda: _rows(run) > n or p.poll() is not None, 240, "the taken-over run to train a step")
    p.send_signal(signal.SIGINT)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out = _finish(p)
    assert p.returncode == 130, out[-3000:]
    assert "taking over from a run that is gone" in out and f"resumed from {run}/checkpoints/{latest}" in out, \
        out[-3000:]
    assert "Ctrl-C again: exiting now, without a checkpoint" in out and "stopped by signal" not in out, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == latest
    assert not (run / "run.lock").exists()


def test_a_stopped_rank_is_named_by_the_watchdog(tiny_pairs, tmp_path):
    run = tmp_path / "run"
    p = _start([f"data.train={tiny_pairs['train']}", "train.steps=400", "checkpoint.every=0",
                "train.hang_timeout_s=6", f"out_dir={run}", "--nproc", "2"])
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
    _wait(lambda: _rows(run) >= 3 or p.poll() is not None, 240, "training to start")
    ranks = _ranks(p)
    ranks[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _wait(lambda: any(ln.startswith("encdec: hang: rank 0") for ln in lines) or p.poll() is not None, 60,
              "the watchdog")
        took = time.monotonic() - t0
        ranks[0].wait(timeout=30)                  # the watchdog's rank exits on its own (status 3)
    finally:
        # what the scheduler does next (srun ends the step; torchrun would wait 30 s on the
        # stopped rank before killing it)
        for q in ranks.values():
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        p.wait(timeout=120)
    out = "".join(lines)
    hang = [ln for ln in lines if ln.startswith("encdec: hang: rank 0")]
    assert p.returncode != 0 and hang and "(exitcode: 3) local_rank: 0" in out, out[-3000:]
    assert "rank 1: step" in hang[0] and "silent" in hang[0] and "phase" in hang[0], hang[0]
    assert took < 30, took
