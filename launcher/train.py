"""Training entry of one rank: what a start does, in order, in one place.

Run by `encdec train` (one process, or each rank under torchrun / srun: `python -m launcher.cli train`).
    1. layout    tp x dp, ZeRO stage, divisibility, TP groups inside a node, no more ranks on a
                 node than its GPUs: checked once, before any process group waits
    2. inputs    sources, manifests, tokenizer and vocabulary resolved once (fills cfg.model; the
                 vocabulary is padded to a multiple of tp, and keeps the rows of what it resumes:
                 launcher/checkpoint/vocab.py)
    3. trainer   process groups, DeepSpeed engine, data stream, monitor
    4. resume    the run's latest checkpoint, a given one, or a Hugging Face folder (if any)
    5. train
"""
from __future__ import annotations

import os

import torch

from launcher.checkpoint.vocab import fit_run_vocab
from launcher.config import RunConfig
from launcher.dist_env import DistEnv, export_torch_env, for_this_process, read_env
from launcher.faults import Faults
from launcher.parallel.dims import check_local_gpus, effective_zero_stage, validate_layout
from launcher.signals import StopSignal
from launcher.training.inputs import resolve_inputs
from launcher.training.trainer import Trainer


def start(cfg: RunConfig, env: DistEnv, stop: StopSignal | None = None) -> Trainer:
    """Steps 1-4: a Trainer ready to train (resumed if there is something to resume from)."""
    how = {"torchrun": f"LOCAL_WORLD_SIZE={env.local_world_size} (torchrun)",
           "slurm": f"{env.local_world_size} Slurm tasks per node"}.get(env.launcher, "")
    check_local_gpus(env.local_world_size, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"), how)
    dims = validate_layout(cfg, env.world_size, env.local_world_size)
    zero = effective_zero_stage(cfg.parallel.zero_stage, dims.dp, cfg.parallel.zero_at_one_rank)
    if zero != cfg.parallel.zero_stage:
        if env.rank == 0:
            print(f"parallel.zero_stage={cfg.parallel.zero_stage} with one data-parallel rank partitions nothing: "
                  f"running ZeRO {zero} (the effective config says so)", flush=True)
        cfg.parallel.zero_stage = zero
    inputs = resolve_inputs(cfg, share=(env.rank, env.world_size))
    fit_run_vocab(cfg, strict=False)
    export_torch_env(for_this_process(env))
    trainer = Trainer(cfg, env, dims, inputs, stop=stop, faults=Faults.from_env())   # test switches, read once
    trainer.resume()
    return trainer


def run(cfg: RunConfig, stop: StopSignal | None = None) -> dict:
    trainer = start(cfg, read_env(), stop)
    out = trainer.train()
    trainer.close()
    return out
