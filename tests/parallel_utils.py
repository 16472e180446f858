"""Helpers for the multi-process tensor-parallel tests: N gloo ranks on a free port.

Ranks are forked (as DataLoader workers are), so they start in milliseconds with the parent's
imports instead of re-importing torch in every process; OMP_NUM_THREADS=1 keeps that safe.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from conftest import free_port


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
