"""Dropout under tensor parallelism (2 gloo ranks): inside a sharded region (a TP rank's attention
heads, T5's gated-FFN columns) the ranks draw different masks; outside it (replicated activations)
the same ones; the shared streams stay in step; activation-checkpoint recompute replays the
private masks (gradients equal to a run without recompute)."""
import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from launcher.parallel import ParallelDims, parallelize
from launcher.parallel.rng import tp_local_rng
from model import build, make_config as ModelConfig
from parallel_utils import spawn


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _rng_digest() -> str:
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]


def _masks(g, private: bool):
    region = nn.Dropout(0.5)
    if private:
        tp_local_rng(region, g)
    torch.manual_seed(123)                                    # the same shared stream on every TP rank
    local = region(torch.ones(32, 32)) != 0
    shared = F.dropout(torch.ones(32, 32), 0.5) != 0          # a replicated activation after the region
    return _gather(local, g), _gather(shared, g), _gather(_rng_digest(), g)


def _check_regions(g):
    local, shared, states = _masks(g, private=True)
    assert not torch.equal(local[0], local[1])                # each rank's shard: masks of its own
    assert 0.3 < local[0].float().mean() < 0.7
    assert torch.equal(shared[0], shared[1]) and states[0] == states[1]
    local, _, _ = _masks(g, private=False)                    # without it, the shards repeat each other
    assert torch.equal(local[0], local[1])

    # recompute under activation checkpointing draws the same private masks
    torch.manual_seed(5)
    lin = nn.Linear(16, 16)
    block = nn.Sequential(lin, tp_local_rng(nn.Dropout(0.3), g))
    x = torch.randn(8, 16)
    grads = []
    for use_ckpt in (False, True):
        lin.zero_grad()
        torch.manual_seed(7)
        y = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        (y * y).sum().backward()
        grads.append(lin.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _check_models(mesh):
    g = mesh.tp_group
    seed_cfg = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1,
                           n_decoder_layers=1, dropout=0.1, attention_dropout=0.2)
    t5_cfg = ModelConfig(arch="t5", vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, head_dim=8, d_ff=48,
                         n_encoder_layers=1, n_decoder_layers=1, dropout=0.2, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16)
    for cfg in (seed_cfg, t5_cfg):
        torch.manual_seed(1)
        model = parallelize(build(cfg), mesh)
        model.train()
        gen = torch.Generator().manual_seed(2)
        src = torch.randint(3, 60, (2, 9), generator=gen)
        tgt = torch.randint(3, 60, (2, 7), generator=gen)
        torch.manual_seed(3)
        loss, _ = model(src, torch.ones_like(src, dtype=torch.bool), tgt[:, :-1], tgt[:, 1:])
        loss.backward()
        # the loss is all-reduced, the shared stream moved alike: replicated activations saw the same masks
        assert len(set(_gather(_rng_digest(), g))) == 1, cfg.arch
        losses = _gather(loss.item(), g)
        assert losses[0] == losses[1], (cfg.arch, losses)
        hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks and m._forward_hooks
                  and ("attn" in n or n.endswith("ffn"))]
        assert hooked, cfg.arch


def _worker(rank, world):
    mesh = ParallelDims(tp=world, dp=1, world_size=world).build(rank)
    _check_regions(mesh.tp_group)
    _check_models(mesh)


def test_tp2_dropout_streams():
    spawn(_worker, 2)
