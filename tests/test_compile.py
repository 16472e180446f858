"""train.compile: torch.compile of every layer gives the eager losses, through the trainer's engine
builder (real DeepSpeed engines, gloo), over several optimizer steps.

CPU compilation is slow (seconds per layer graph), so this covers two layouts on 2 ranks:
ZeRO-3 with dp 2 (parameters gathered by ZeRO's hooks around compiled layers) and tp 2 with
ZeRO-1 (the TP collectives inside the compiled layers), with dropout and padded batches.
"""
import logging

import pytest
import torch
from torch.testing import assert_close

from parallel_utils import spawn

STEPS = 3


def _batch(step, dp_rank, micro=2):
    g = torch.Generator().manual_seed(100 + step)
    B, S, T = 2 * micro, 6, 5
    src = torch.randint(3, 60, (B, S), generator=g)
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[0, 4:] = False
    tgt = torch.randint(3, 60, (B, T + 1), generator=g)
    labels = tgt[:, 1:].clone()
    labels[1, 3:] = -100
    rows = slice(dp_rank * micro, (dp_rank + 1) * micro)
    return src[rows], src_mask[rows], tgt[rows, :-1], labels[rows], int((labels != -100).sum())


def _losses(cfg, rank, world, compile):
    import deepspeed
    from launcher.parallel import ParallelDims
    from launcher.training.engine import build_engine
    from launcher.training.inputs import model_config
    cfg.train.compile = compile
    cfg.model = model_config(cfg, 60)
    mesh = ParallelDims(tp=cfg.parallel.tp, dp=world // cfg.parallel.tp, world_size=world).build(rank)
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, mesh, "cpu", 1)
    out = []
    for step in range(STEPS):
        torch.manual_seed(step)                       # the same dropout masks in both runs
        src, mask, tgt_in, labels, n = _batch(step, mesh.dp_rank)
        loss, _ = engine(src, mask, tgt_in, labels)
        engine.backward(loss * mesh.dp / n)
        engine.step()
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        out.append(t.item() / mesh.tp / n)
    engine.destroy()
    del deepspeed
    return out


def _worker(rank, world, layouts):
    import deepspeed
    from launcher.config import load_config
    import torch._inductor.config
    torch._inductor.config.fallback_random = True     # compiled dropout draws eager's random numbers
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    for tp, stage in layouts:
        cfg = load_config("configs/test-tiny.yaml", [f"parallel.tp={tp}", f"parallel.zero_stage={stage}",
                                                     "model.dropout=0.1", "train.micro_batch_size=2",
                                                     "train.global_batch_size=4"])
        eager = _losses(cfg, rank, world, False)
        compiled = _losses(cfg, rank, world, True)
        assert_close(compiled, eager, rtol=1e-5, atol=1e-6, msg=lambda m: f"tp {tp} zero {stage}: {m}")
        assert eager[0] != eager[-1]


@pytest.mark.slow
def test_compiled_layers_equal_eager_losses():
    spawn(_worker, 2, [(1, 3), (2, 1)])
