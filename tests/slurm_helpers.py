"""Driving the local Slurm cluster from tests: start/stop shared by concurrent sessions, submit, poll.

The cluster (scripts/slurm_cluster.sh) is one per state folder. Several pytest sessions may use it
at once, so each session registers itself under STATE/users/ and only the last one leaving stops it.
It runs on its own configuration, STATE/slurm.conf (never /etc/slurm/slurm.conf): every Slurm
command the tests run gets SLURM_CONF (start() also sets it in os.environ, so plain
subprocess.run(["scancel", ...]) and the jobs' own srun/scontrol find the same cluster).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SH = os.path.join(ROOT, "scripts", "slurm_cluster.sh")
SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")
STATE_DIR = os.environ.get("ENCDEC_SLURM_STATE", "/tmp/encdec-slurm-state")
SLURM_CONF = os.path.join(STATE_DIR, "slurm.conf")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
# CPU jobs on the emulated nodes: no GPUs asked (the header asks for --gres=gpu:8).
CPU_ARGS = ["--gres=none", "--cpus-per-task=1", "--time=10"]


def cannot_run_reason() -> str | None:
    """Why Slurm cannot be started here, or None."""
    if os.geteuid() != 0:
        return "not root: the Slurm tests install packages and start slurmctld/slurmd/munged as root"
    if not shutil.which("slurmctld") and not os.path.exists("/usr/sbin/slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def slurm_env(extra: dict | None = None) -> dict:
    """The environment for a Slurm command against the local cluster."""
    return {**os.environ, **(extra or {}), "SLURM_CONF": SLURM_CONF}


def _run_cluster(cmd: str, state: str = STATE_DIR) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", CLUSTER_SH, cmd, state], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLURM_CONF": os.path.join(state, "slurm.conf")})


class SharedCluster:
    """start() registers this process and starts the cluster if needed; release() stops it if last."""

    def __init__(self, state_dir: str = STATE_DIR):
        self.state = state_dir
        self.users = os.path.join(state_dir, "users")
        self.me = os.path.join(self.users, str(os.getpid()))
        self.start_s = 0.0

    def _locked(self):
        os.makedirs(self.users, exist_ok=True)
        f = open(os.path.join(self.state, "users.lock"), "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def start(self) -> str:
        with self._locked():
            open(self.me, "w").close()
            t0 = time.perf_counter()
            r = _run_cluster("start", self.state)
            self.start_s = time.perf_counter() - t0
            if r.returncode:
                os.remove(self.me)
                raise RuntimeError(f"scripts/slurm_cluster.sh start failed:\n{r.stdout}{r.stderr}")
            os.environ["SLURM_CONF"] = os.path.join(self.state, "slurm.conf")
            return r.stdout.strip()

    def release(self) -> None:
        with self._locked():
            if os.path.exists(self.me):
                os.remove(self.me)
            for name in os.listdir(self.users):
                if not _pid_alive(int(name)):
                    os.remove(os.path.join(self.users, name))
            if not os.listdir(self.users):
                r = _run_cluster("stop", self.state)
                if r.returncode:
                    raise RuntimeError(f"scripts/slurm_cluster.sh stop failed:\n{r.stdout}{r.stderr}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def sbatch(args: list[str], env: dict, cwd: str = ROOT) -> str:
    """Submits slurm/train.sbatch with extra sbatch options; returns the job id."""
    full_env = slurm_env(env)
    r = subprocess.run(["sbatch", "--parsable", *args, SBATCH], capture_output=True, text=True,
                       env=full_env, cwd=cwd, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict:
    """`scontrol show job` as a dict ({} once Slurm has forgotten the job)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30,
                       env=slurm_env())
    if r.returncode:
        return {}
    info = {}
    for item in r.stdout.split():
        if "=" in item:
            k, v = item.split("=", 1)
            info[k] = v
    return info


def wait_job(job_id: str, timeout: float, until=lambda info: info.get("JobState") in TERMINAL,
             poll: float = 0.5) -> dict:
    """Polls the job until `until(info)`; fails the test with the job's state after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info and until(info):
            return info
        time.sleep(poll)
    subprocess.run(["scancel", job_id], timeout=30, env=slurm_env())
    raise AssertionError(f"job {job_id} did not reach the expected state in {timeout:.0f} s: "
                         f"{info.get('JobState')} ({info.get('Reason')})")


def wait_for(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""

