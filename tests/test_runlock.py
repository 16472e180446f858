"""RUN_DIR/run.lock exists only while a live run holds it: a busy folder keeps its owner's file,
a clean exit (or any exit through Python after the lock, an error included) removes it, and a
dead owner's file is taken over. The holders are real processes (fcntl locks are per process)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HOLD = """
import sys, time
from launcher.training.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", lock.took_over, flush=True)
if sys.argv[2] == "error":
    raise SystemExit("an error after the lock")
time.sleep(120)
"""


def _holder(run, how):
    return subprocess.Popen([sys.executable, "-c", HOLD, str(run), how], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_run_lock_is_removed_by_its_holder_only(tmp_path):
    from launcher.training.runlock import LOCK_FILE, RunBusy, RunLock
    path = tmp_path / LOCK_FILE
    p = _holder(tmp_path, "sleep")
    try:
        assert p.stdout.readline().split() == ["held"]
        with pytest.raises(RunBusy, match=f"pid {p.pid}"):
            RunLock(str(tmp_path)).acquire()
        assert path.exists() and f'"pid": {p.pid}' in path.read_text()     # a refused run leaves it alone
    finally:
        p.kill()
        p.wait()
    lock = RunLock(str(tmp_path)).acquire()                                  # a dead owner: taken over
    assert f"pid {p.pid}" in lock.took_over
    lock.release()
    assert not path.exists()
    # an error after taking the lock: the process leaves through Python, the file goes with it
    q = _holder(tmp_path, "error")
    out, err = q.communicate(timeout=60)
    assert q.returncode == 1 and out.split() == ["held"] and "an error after the lock" in err
    assert not path.exists()
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.took_over == "" and os.path.exists(path)
    lock.release()
