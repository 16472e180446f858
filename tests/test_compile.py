"""train.compile gives the eager losses, through the trainer's engine builder (real DeepSpeed
engines, gloo), over several optimizer steps.

CPU compilation is slow (seconds per graph), so this covers each compile scope once, on 2 ranks,
with dropout and padded batches: ZeRO-3 with dp 2 ("layers": parameters gathered by ZeRO's hooks
around the compiled layers), ZeRO-2 with dp 2 and activation checkpointing ("stacks": encoder,
decoder and loss compiled apart, the checkpointed layers traced into them, ZeRO's gradient hooks
after their backward) and tp 2 x dp 1 with ZeRO-1 and activation checkpointing ("model": the whole
forward, the TP collectives inside it).
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
    return {"src": src[rows], "src_mask": src_mask[rows], "tgt_in": tgt[rows, :-1].contiguous(),
            "labels": labels[rows], "pad_frac": 0.0, "keys": [""] * micro}


def _losses(cfg, rank, world, compile):
    """Global losses of STEPS optimizer steps through the trainer's step (TrainStep: its first
    forward runs under the precision check's dispatch mode, which once kept compile from ever
    compiling), and the number of graphs dynamo compiled meanwhile."""
    import torch._dynamo
    from launcher.parallel import ParallelDims
    from launcher.training.guard import StepGuard
    from launcher.training.inputs import model_config
    from launcher.training.step import TrainStep
    cfg.train.compile = compile
    cfg.model = model_config(cfg, 60)
    mesh = ParallelDims(tp=cfg.parallel.tp, dp=world // cfg.parallel.tp, world_size=world).build(rank)
    torch.manual_seed(0)
    step = TrainStep(cfg, mesh, "cpu", 1, StepGuard(cfg.train.max_bad_steps, cfg.train.spike_z, cfg.train.spike_window))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = []
    for i in range(STEPS):
        torch.manual_seed(i)                          # the same dropout masks in both runs
        out.append(step([_batch(i, mesh.dp_rank)], i).loss)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]     # (DeepSpeed compiles helpers of its own)
    step.engine.destroy()
    return out, graphs


def _worker(rank, world, layouts):
    import deepspeed
    from launcher.config import load_config
    import torch._inductor.config
    torch._inductor.config.fallback_random = True     # compiled dropout draws eager's random numbers
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    from launcher.training.engine import compile_scope
    for tp, stage, ckpt, scope in layouts:
        cfg = load_config("configs/test-tiny.yaml", [f"parallel.tp={tp}", f"parallel.zero_stage={stage}",
                                                     f"parallel.activation_checkpointing={ckpt}",
                                                     "model.dropout=0.1", "train.micro_batch_size=2",
                                                     "train.global_batch_size=4"])
        eager, eager_graphs = _losses(cfg, rank, world, False)
        compiled, graphs = _losses(cfg, rank, world, True)
        assert graphs > eager_graphs, f"tp {tp} zero {stage}: train.compile compiled nothing"
        assert compile_scope(cfg, world // tp) == scope
        assert_close(compiled, eager, rtol=1e-5, atol=1e-6, msg=lambda m: f"tp {tp} zero {stage} ckpt {ckpt}: {m}")
        assert eager[0] != eager[-1]


@pytest.mark.slow
def test_compiled_equal_eager_losses():
    spawn(_worker, 2, [(1, 3, False, "layers"), (1, 2, True, "stacks"), (2, 1, True, "model")])   # tp 2 last: DeepSpeed keeps its groups
