"""Helpers for the checkpoint tests: real Trainers (tests/conftest.py's tiny data) in real process groups.

Ranks are forked with torch.multiprocessing (gloo on CPU); each rank can build several Trainers
one after the other in the same process group (a straight run, a stopped run, a resumed run), so
one test pays the process start-up once. Rank 0 returns what the worker function returns.
"""
from __future__ import annotations

import json
import os
import signal
import traceback

import torch
import torch.multiprocessing as mp

from launcher.dist_env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "test-tiny.yaml")


def make_cfg(data: str, out_dir: str, *overrides: str):
    from launcher.config import load_config
    return load_config(TINY, [f"data.train={data}", f"out_dir={out_dir}", "wandb.mode=disabled", *overrides])


def trainer(data: str, out_dir: str, *overrides: str):
    """A Trainer built (and resumed) by the training entry, as `encdec train` does."""
    from launcher.dist_env import read_env
    from launcher.train import start
    return start(make_cfg(data, out_dir, *overrides), read_env())


def consolidated(path: str):
    """(config, unsharded fp32 parameters) of a run folder, a checkpoints folder or a tag folder."""
    from launcher.checkpoint.format import resolve_checkpoint
    from launcher.checkpoint.reader import CheckpointReader
    root, tag = resolve_checkpoint(str(path))
    reader = CheckpointReader(os.path.join(root, tag))
    return reader.cfg, {n: reader.get(n) for n in reader.names()}


def train(data: str, out_dir: str, *overrides: str, stop_after: int | None = None):
    """Builds a Trainer and trains; with stop_after, rank 0 gets SIGUSR1 after that many steps
    (the preemption path: all ranks agree, save a checkpoint and leave the loop)."""
    t = trainer(data, out_dir, *overrides)
    if stop_after is not None:
        inner = t.train_step

        def step(batches):
            out = inner(batches)
            if t.step + 1 == stop_after and t.env.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out
        t.train_step = step
    t.train()
    return t


def metrics(out_dir: str) -> dict[int, dict]:
    """step -> the last train row logged for it (a resumed run re-logs nothing before its checkpoint)."""
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                rows[r["step"]] = r
    return rows


def _entry(rank: int, world: int, port: int, fn, args, out_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        res = fn(*args)
        err = None
    except BaseException as e:  # noqa: BLE001 - reported to the test
        res, err = None, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
    if rank == 0 or err:
        with open(f"{out_file}.{rank}", "w", encoding="utf-8") as f:
            json.dump({"result": res, "error": err}, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    if err:
        raise SystemExit(1)


def _warm() -> None:
    """Forked ranks inherit what the test process imported: deepspeed, and torch._dynamo (which the
    first torch optimizer imports, seconds of work) are loaded once here instead of in every rank."""
    import launcher.train  # noqa: F401
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def run_ranks_killed(world: int, fn, *args, env: dict, tmp: str, wait_s: float = 60.0) -> list:
    """Runs fn on `world` forked ranks with `env` set (e.g. ENCDEC_CKPT_KILL) where some rank is
    expected to die; ranks still alive wait_s seconds after the first death are killed too, as a
    job scheduler would. Returns the exit codes."""
    import time
    _warm()
    os.environ.update(env)
    try:
        ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, os.path.join(tmp, "killed")),
                                 nprocs=world, join=False, start_method="fork")
    finally:
        for k in env:
            os.environ.pop(k, None)
    procs, first_death = ctx.processes, None
    while any(p.is_alive() for p in procs):
        if first_death is None and any(not p.is_alive() for p in procs):
            first_death = time.time()
        if first_death is not None and time.time() - first_death > wait_s:
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.1)
    return [p.exitcode for p in procs]


def run_ranks(world: int, fn, *args, tmp: str):
    """Runs fn(*args) on `world` forked ranks; returns rank 0's result or raises with the first error."""
    _warm()
    out = os.path.join(tmp, f"result-{os.getpid()}-{free_port()}")
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=False,
                             start_method="fork")
    try:
        while not ctx.join(timeout=300):
            pass
    except mp.ProcessRaisedException as e:
        raise AssertionError(str(e)) from None
    except mp.ProcessExitedException:
        pass
    for r in range(world):
        p = f"{out}.{r}"
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
            if d["error"]:
                raise AssertionError(d["error"])
    with open(f"{out}.0", encoding="utf-8") as f:
        return json.load(f)["result"]
