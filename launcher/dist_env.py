"""The one place that reads the process layout from the environment.

Three launchers are understood, in this order:
  torchrun / torch.distributed.run : RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
  Slurm srun (one task per GPU)     : SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE ...
  a plain single process            : rank 0 of 1
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str            # torchrun | slurm | single


def _slurm_tasks_per_node(env) -> int:
    # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE is "4(x2)" or "4,2"
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    tpn = env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0]
    return int(tpn.split("(")[0])


def read_env(env=None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("under srun, MASTER_ADDR and MASTER_PORT must be exported by the batch script")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)), local_world_size=_slurm_tasks_per_node(env),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]), launcher="slurm")
    return DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 0, "single")


def export_torch_env(d: DistEnv) -> None:
    """Sets the variables torch.distributed's env:// init reads (needed under srun)."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))


def free_port() -> int:
    """A TCP port free on this machine now (for one-process groups, tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def for_this_process(d: DistEnv) -> DistEnv:
    """The environment to export: a single process gets a one-process group on a free local port."""
    return replace(d, master_port=free_port()) if d.launcher == "single" else d
