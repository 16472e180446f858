"""Dropout on tensor-parallel shards: a private RNG stream per TP rank around a sharded region.

Every rank's RNG is keyed by (seed, step, dp rank) (launcher/checkpoint/rng.py), so the ranks of a
TP group draw the same dropout masks: right for replicated activations (embeddings, residual
branches), whose copies must stay identical. Inside a sharded region (attention probabilities of
this rank's heads, the gated FFN's hidden columns) the same masks would repeat across the shards:
head h on TP rank 0 and head h + H/tp on rank 1 would always be dropped together. Megatron keeps a
second "model-parallel" RNG stream for these regions; so does this module:

    before the region   draw one 62-bit seed from the shared CPU stream (the same on every TP
                        rank: the shared streams stay in step), save the device generator's state,
                        seed it with (that seed, tp rank)
    after the region    restore the saved state: the region's draws never touch the shared stream

The private seed is a function of the shared CPU stream at the region's entry, which activation
checkpointing stashes and restores for its recompute, so the recompute draws the same masks.
Applied from outside by the TP plans, only where the region's dropout probability is > 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

_MIX = 0x9E3779B97F4A7C15            # odd 64-bit constant: (seed, tp rank) -> distinct seeds


def _device_of(args, kwargs) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _generator_state(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator.get_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_generator(device: torch.device, state=None, seed: int | None = None) -> None:
    if device.type == "cpu":
        if state is not None:
            torch.default_generator.set_state(state)
        else:
            torch.default_generator.manual_seed(seed)
        return
    mod = torch.get_device_module(device.type)
    if state is not None:
        mod.set_rng_state(state, device)
    else:
        with mod.device(device):
            mod.manual_seed(seed)


def tp_local_rng(module: nn.Module, group) -> nn.Module:
    """Runs `module`'s forward on a private RNG stream of this TP rank (see the module docstring)."""
    tp_rank = dist.get_rank(group)
    saved: list = []

    def enter(mod, args, kwargs):
        shared_draw = int(torch.randint(0, 1 << 62, (1,)).item())   # shared CPU stream, all TP ranks alike
        device = _device_of(args, kwargs)
        saved.append((device, _generator_state(device)))
        _set_generator(device, seed=(shared_draw ^ (tp_rank * _MIX)) & ((1 << 63) - 1))

    def leave(mod, args, output):
        device, state = saved.pop()
        _set_generator(device, state=state)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave)
    return module
