"""Seeds on every start path, tp2 x dp2 with dropout 0.1 (4 gloo ranks, ZeRO 1).

Every RNG of a rank is keyed by (seed, step, dp rank): the ranks of a TP group draw the same
dropout masks, so parameters replicated across the group (LayerNorms, row-parallel biases) stay
bitwise equal; data-parallel ranks draw different ones. Checked after a fresh start, a same-layout
resume, a resume from another layout (tp1 x dp4) and a start from a Hugging Face folder.
"""
import hashlib
import os

import pytest
import torch
import torch.distributed as dist

from ckpt_helpers import run_ranks, trainer

COMMON = ("parallel.tp=2", "parallel.zero_stage=1", "model.dropout=0.1", "checkpoint.every=0", "train.steps=3")


def _train_checked(data, out, *over):
    """Trains; returns (replicated parameters equal across the TP group, per-rank RNG digest per step)."""
    t = trainer(data, out, *COMMON, *over)
    digests = []
    inner = t.train_step

    def step(batches):
        digests.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12])
        return inner(batches)
    t.train_step = step
    t.train()
    same = True
    for n, p in t.engine.module.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        mine = p.detach().clone()
        other = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(other, mine, group=t.mesh.tp_group)
        same &= all(torch.equal(o, other[0]) for o in other)
    all_digests = [None] * dist.get_world_size()
    dist.all_gather_object(all_digests, digests)
    return same, all_digests


def _paths(data, base):
    res = {}
    # first (DeepSpeed keeps a tp engine's mpu for later engines of the process): a tp1 x dp4
    # checkpoint at step 1, to seed a tp2 x dp2 run below
    other = os.path.join(base, "dp4")
    t = trainer(data, other, "parallel.tp=1", "parallel.zero_stage=1", "model.dropout=0.1", "train.steps=1",
                "train.micro_batch_size=2")
    t.train()
    res["fresh"] = _train_checked(data, os.path.join(base, "fresh"))
    # same layout: stopped after step 1 (a checkpoint), resumed to 3
    run = os.path.join(base, "same")
    trainer_ = _train_checked(data, run, "train.steps=1")
    res["same-layout resume"] = _train_checked(data, run)
    del trainer_
    res["other-layout resume"] = _train_checked(data, os.path.join(base, "from-dp4"),
                                                f"checkpoint.resume={other}/checkpoints")
    # a Hugging Face folder
    hf = os.path.join(base, "hf")
    if dist.get_rank() == 0:
        from launcher.hf.export import convert
        convert(os.path.join(other, "checkpoints"), hf, progress=False)
    dist.barrier()
    res["hf start"] = _train_checked(data, os.path.join(base, "from-hf"), f"checkpoint.resume={hf}")
    return res


@pytest.mark.slow
def test_tp_ranks_share_dropout_and_dp_ranks_do_not_on_every_start_path(tiny_pairs, tmp_path):
    res = run_ranks(4, _paths, tiny_pairs["train"], str(tmp_path), tmp=str(tmp_path))
    assert sorted(res) == sorted(["fresh", "same-layout resume", "other-layout resume", "hf start"])
    for path, (same, digests) in res.items():
        assert same, f"{path}: replicated parameters differ across the TP group"
        # ranks 0,1 = TP group of dp rank 0; ranks 2,3 = dp rank 1 (TP groups are consecutive ranks)
        assert digests[0] == digests[1] and digests[2] == digests[3], (path, digests)
        assert all(a != b for a, b in zip(digests[0], digests[2])), (path, digests)
        assert len(set(digests[0])) == len(digests[0]), (path, digests)      # a new draw every step
