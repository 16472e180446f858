"""Data under faults: untrusted manifests stay data; the stop signals Slurm sends to every
process of a step do not kill loader workers or cut `pipe:` shards short."""
import gc
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from data.sources import DataError, resolve_source
from data.stream import DataStream, steps_in_epoch
from tests.data_helpers import stream_spec
from tests.conftest import run_cli
from tests.test_data_sources import write_shards


@pytest.fixture
def shards_dir(tmp_path):
    return write_shards(str(tmp_path / "ds"), (5, 7, 4, 8))


def _rewrite_manifest(folder, name):
    path = os.path.join(folder, "manifest.json")
    man = json.load(open(path))
    man["shards"][1]["name"] = name
    with open(path, "w") as f:
        json.dump(man, f)
    return path


@pytest.mark.parametrize("kind", ["pipe", "abs", "dotdot", "s3", "file"])
def test_manifest_names_that_are_not_plain_relative_files_are_refused(shards_dir, tmp_path, kind):
    witness = tmp_path / "pwned"
    name = {"pipe": f"pipe:touch {witness}; cat part-001.tar",
            "abs": os.path.join(shards_dir, "part-001.tar"),
            "dotdot": "../ds/part-001.tar",
            "s3": "s3://bucket/part-001.tar",
            "file": f"file://{shards_dir}/part-001.tar"}[kind]
    man = _rewrite_manifest(shards_dir, name)
    for src in (shards_dir, man):                   # the prepared folder and the manifest itself
        with pytest.raises(DataError) as e:
            resolve_source(src)
        msg = str(e.value)
        assert "\n" not in msg and man in msg and "shard 1" in msg and "refused" in msg, msg
    # the CLI: one line, before any process group (no rank started, no run folder written)
    out = tmp_path / "run"
    r = run_cli(["train", "configs/test-tiny.yaml", f"data.train={shards_dir}", f"out_dir={out}"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("encdec: error:"), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr, r.stderr
    assert not witness.exists() and not out.exists()


def test_plain_relative_names_in_subfolders_still_work(shards_dir):
    os.makedirs(os.path.join(shards_dir, "sub"))
    os.rename(os.path.join(shards_dir, "part-001.tar"), os.path.join(shards_dir, "sub", "part-001.tar"))
    _rewrite_manifest(shards_dir, "sub/part-001.tar")
    shards = resolve_source(shards_dir)
    assert [s.num_samples for s in shards] == [5, 7, 4, 8]
    assert shards[1].url == os.path.join(shards_dir, "sub/part-001.tar")


def _epoch(shards, workers):
    spec = stream_spec(shards=shards, objective="pairs", num_streams=4, shuffle_block=4, seed=0, global_batch=4,
                      max_src_len=16, max_tgt_len=8, max_bad_samples=0)
    s = DataStream(spec, 0, 1, micro_batch=2, num_workers=workers)
    it = iter(s)
    return [k for _ in range(steps_in_epoch(spec) * 2) for k in next(it)["keys"]], s


SIGNALLER = """
import itertools, os, signal, sys, time
import psutil
root, stop, me, hit = psutil.Process(int(sys.argv[1])), sys.argv[2], os.getpid(), []
for sig in itertools.cycle((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
    if os.path.exists(stop):
        break
    for k in root.children(recursive=True):
        try:
            if k.pid != me:
                name = k.name()
                k.send_signal(sig)
                hit.append(name)
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass
    time.sleep(0.05)
print(" ".join(hit))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_and_pipe_commands_survive_the_stop_signals(shards_dir, workers):
    """As `scancel` / `--signal` without B: do, USR1, TERM and INT reach every process of the
    rank, over and over while an epoch is read: its loader workers and their `pipe:` shells (each
    waits before writing its shard, so signals land while it runs). The main process alone acts
    (here: a handler like the trainer's that only records); every sample must be read, none
    counted bad (max_bad_samples=0 would raise)."""
    shards = resolve_source("pipe:sleep 0.3; cat " + os.path.join(shards_dir, "part-{000..003}.tar"))
    ref, _ = _epoch(resolve_source(shards_dir), 0)
    stop_file = shards_dir + "/stop-signalling"
    # the sender must not be the rank's main process (a worker takes TERM from its parent as the
    # loader's own shutdown): a separate process, as slurmstepd is
    sender = subprocess.Popen([sys.executable, "-c", SIGNALLER, str(os.getpid()), stop_file],
                              stdout=subprocess.PIPE, text=True)
    got = []
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
           for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        keys, stream = _epoch(shards, workers)
    finally:
        open(stop_file, "w").close()
        hit = sender.communicate(timeout=60)[0].split()
        for sig, h in old.items():
            signal.signal(sig, h)
    assert hit.count("sleep") >= 3 and (workers == 0 or len(set(hit) - {"sh", "sleep"}) >= 1), hit
    assert keys == ref and stream.skipped == 0
    # and the loader still ends its workers (their TERM from the parent is obeyed), pipes closed
    del stream
    gc.collect()                                    # the readers' last pipes are closed (reaped) here
    deadline = time.monotonic() + 15
    while _alive_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive_children()


def _alive_children():
    out = []
    for k in psutil.Process().children(recursive=True):
        try:
            if k.status() != psutil.STATUS_ZOMBIE:
                out.append(k)
        except psutil.NoSuchProcess:
            pass
    return out
