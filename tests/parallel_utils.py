"""Helpers for the multi-process tensor-parallel tests: N gloo ranks on a free port, and joining
or splitting TP shards of state dicts (to compare a sharded model with its unsharded reference).

Ranks are forked (as DataLoader workers are), so they start in milliseconds with the parent's
imports instead of re-importing torch in every process; OMP_NUM_THREADS=1 keeps that safe.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.testing import assert_close

from launcher.dist_env import free_port
from launcher.parallel.dims import Mesh
from launcher.parallel.plan import shard_dims


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    """Runs fn(rank, world, *args) on `world` processes; an exception in any rank fails the caller."""
    assert_close(torch.zeros(1), torch.zeros(1))      # its lazy imports (~0.5 s) happen once, here
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True,
                       start_method="fork")


def merge_tp_state_dicts(shards: list[dict], dims: dict[str, int], check_replicated: bool = True) -> dict:
    """Per-TP-rank state dicts (index = tp rank) -> the unsharded model's state dict.

    Sharded tensors are concatenated along their dimension; replicated ones are taken from rank 0
    and, with check_replicated, must be identical on every rank (they are kept in sync exactly).
    """
    if not shards:
        raise ValueError("merge_tp_state_dicts: no shards given")
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if list(sd) != keys:
            missing = sorted(set(keys) ^ set(sd))
            raise ValueError(f"merge_tp_state_dicts: tp rank {r} has different keys (differ: {missing[:5]})")
    out = {}
    for k in keys:
        ts = [sd[k] for sd in shards]
        if k in dims and len(shards) > 1:
            out[k] = torch.cat([t.detach().cpu() for t in ts], dim=dims[k])
        else:
            out[k] = ts[0]
            if check_replicated and isinstance(ts[0], torch.Tensor):
                for r, t in enumerate(ts[1:], 1):
                    if not torch.equal(t.cpu(), ts[0].cpu()):
                        raise ValueError(f"merge_tp_state_dicts: replicated tensor '{k}' differs between "
                                         f"tp rank 0 and tp rank {r}")
    return out


def split_state_dict(full: dict, dims: dict[str, int], tp_rank: int, tp: int) -> dict:
    """The inverse of merge_tp_state_dicts: this TP rank's slice of an unsharded state dict."""
    out = {}
    for k, t in full.items():
        if k in dims and tp > 1:
            n = t.shape[dims[k]]
            if n % tp:
                raise ValueError(f"split_state_dict: '{k}' size {n} along dim {dims[k]} does not split over tp={tp}")
            out[k] = t.narrow(dims[k], tp_rank * (n // tp), n // tp).clone()
        else:
            out[k] = t
    return out


def gather_full_state_dict(model: nn.Module, mesh: Mesh, tensors: dict | None = None) -> dict:
    """All-gathers the TP shards of `tensors` (default: model.state_dict()) on every TP rank -> unsharded keys.

    Works for any dict keyed like the state dict (e.g. parameter gradients). Collective over the TP group.
    """
    tensors = model.state_dict() if tensors is None else tensors
    if mesh.tp == 1:
        return dict(tensors)
    dims = shard_dims(model)
    out = {}
    for k, t in tensors.items():
        if k in dims:
            parts = [torch.empty_like(t) for _ in range(mesh.tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=mesh.tp_group)
            out[k] = torch.cat(parts, dim=dims[k])
        else:
            out[k] = t
    return out
