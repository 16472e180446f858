"""One run at a time per run folder: RUN_DIR/run.lock, held by rank 0 for the run's lifetime.

The lock is an fcntl lock on the file (the kernel drops it when its process dies, however it
dies) plus an owner record in the file (host, pid, Slurm job id, start time) to name the owner
in the refusal. A second run on a busy folder (a job submitted twice, a resubmission while the
first still runs) is refused with one line naming the owner. A stale owner (its process or job
gone: kill -9, a lost node, a requeue) holds no lock any more, so the next run takes the folder
over and resumes; on file systems where fcntl locks do not cross nodes, a record of another
Slurm job that is still in the queue refuses too.

The file exists only while a run holds it: release() (the trainer's exit, a stop by signal, a
second Ctrl-C; at interpreter exit after any other error) removes it while still holding the
lock, so the next run finds no owner record to take over. A run that opened the file just before
it was removed holds a lock on a file no longer in the folder: acquire() checks that the file it
locked is still the folder's (same inode) and starts again otherwise. Only the holder removes it.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time

from common.errors import UserError
from launcher import run_files

LOCK_FILE = run_files.LOCK


class RunBusy(UserError):
    """The run folder is owned by another live run (printed as one `encdec: error:` line)."""


def _owner_text(rec: dict) -> str:
    job = f"Slurm job {rec['job']}, " if rec.get("job") else ""
    return f"{job}host {rec.get('host', '?')} pid {rec.get('pid', '?')}"


def _job_alive(job: str) -> bool:
    if not shutil.which("squeue"):
        return False
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd, self.pid = None, 0
        self.took_over = ""

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                prev = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                prev = {}
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunBusy(f"run folder {os.path.dirname(self.path)} is in use by {_owner_text(prev)} "
                              f"(since {prev.get('started', '?')}); wait for it, cancel it, or use another "
                              "out_dir") from None
            if self._is_current(fd):
                break
            os.close(fd)                  # the holder removed it between our open and lock: again
        try:                              # an owner record written before our lock: read it again
            prev = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            prev = {}
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if prev.get("job") and prev["job"] != me["job"] and _job_alive(prev["job"]):
            os.close(fd)
            raise RunBusy(f"run folder {os.path.dirname(self.path)} is in use by {_owner_text(prev)} "
                          f"(still in the Slurm queue); cancel it or use another out_dir")
        if prev.get("pid"):
            self.took_over = _owner_text(prev)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd, self.pid = fd, os.getpid()
        atexit.register(self.release)     # whatever way this process leaves Python
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return os.fstat(fd).st_ino == st.st_ino and os.fstat(fd).st_dev == st.st_dev

    def release(self) -> None:
        """Removes the file (only the holder: we hold the lock) and drops the lock. A forked
        child (a loader worker) inherits the object, not the lock: it leaves both alone."""
        if self.fd is None or os.getpid() != self.pid:
            return
        atexit.unregister(self.release)
        try:
            if self._is_current(self.fd):
                os.unlink(self.path)
        except OSError:
            os.ftruncate(self.fd, 0)      # cannot remove it: at least no owner record is left
        os.close(self.fd)                 # closing drops the lock
        self.fd = None
