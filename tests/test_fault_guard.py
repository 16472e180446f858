"""The non-finite guard on real DeepSpeed engines, 2 gloo ranks, loader workers, dropout 0.1.

A NaN injected into one rank's batch at one step (ENCDEC_FAULT_NAN, as a poisoned batch would)
must skip that step on every rank and change nothing but the data position: the final
parameters equal, bitwise, a run in which that batch is skipped by construction (its checkpoint
moved one global batch on), and the skipped step's checkpoint equals the one before it
(parameters and both Adam moments). Every checkpoint is finite and metrics.jsonl is strict JSON.
ZeRO 2 and 3 go through DeepSpeed's own overflow skip; ZeRO 0 through the trainer's.
"""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from ckpt_helpers import consolidated, run_ranks, train

STEPS, BAD = 6, 3            # the batch of step index 3 (logged as step 4) is poisoned
G = 8                        # global batch of test-tiny


def _runs(data, base, stages):
    out = {}
    for z in stages:
        common = (f"parallel.zero_stage={z}", f"train.steps={STEPS}", "model.dropout=0.1", "data.num_workers=1",
                  "checkpoint.every=1", "checkpoint.keep=10")
        a, b = os.path.join(base, f"z{z}-poisoned"), os.path.join(base, f"z{z}-constructed")
        os.environ["ENCDEC_FAULT_NAN"] = f"1:{BAD}"
        try:
            t = train(data, a, *common)
        finally:
            del os.environ["ENCDEC_FAULT_NAN"]
        skipped = [None] * dist.get_world_size()
        dist.all_gather_object(skipped, t.state.guard.skipped)
        # by construction: BAD steps, then the checkpoint moved past one global batch, then on
        train(data, b, *common[:1], f"train.steps={BAD}", *common[2:])
        if dist.get_rank() == 0:
            p = os.path.join(b, "checkpoints", f"step{BAD:08d}", "trainer_state.json")
            st = json.load(open(p))
            st["step"] += 1
            st["data"]["cursor"] += G
            with open(p, "w") as f:
                json.dump(st, f)
        dist.barrier()
        train(data, b, *common)
        out[z] = {"skipped_per_rank": skipped}
    return out


def _params(path, key="fp32"):
    cfg, p = consolidated(path)
    if key == "fp32":
        return p
    from launcher.checkpoint.format import resolve_checkpoint
    from launcher.checkpoint.reader import CheckpointReader
    root, tag = resolve_checkpoint(str(path))
    r = CheckpointReader(os.path.join(root, tag))
    return {n: r.get(n, key) for n in r.names()}


@pytest.mark.slow
def test_nan_batch_is_skipped_on_every_rank_and_changes_nothing_else(tiny_pairs, tmp_path):
    stages = [0, 2, 3]
    res = run_ranks(2, _runs, tiny_pairs["train"], str(tmp_path), stages, tmp=str(tmp_path))
    for z in stages:
        r = res[str(z)] if str(z) in res else res[z]
        assert r["skipped_per_rank"] == [1, 1], (z, r)
        a = tmp_path / f"z{z}-poisoned"
        ck = a / "checkpoints"
        # metrics.jsonl: strict JSON, the skipped step logged with a null loss and the counter
        rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
                for line in (a / "metrics.jsonl").read_text().splitlines()]
        train_rows = {row["step"]: row for row in rows if row["kind"] == "train"}
        assert train_rows[BAD + 1]["loss"] is None and train_rows[BAD + 1]["skipped_steps"] == 1, z
        assert train_rows[STEPS]["skipped_steps"] == 1 and train_rows[BAD]["skipped_steps"] == 0
        assert all(math.isfinite(train_rows[s]["loss"]) for s in train_rows if s != BAD + 1)
        # every checkpoint finite; the skipped step's equals the one before it (weights and moments)
        for s in range(1, STEPS + 1):
            assert all(torch.isfinite(t).all() for t in _params(ck / f"step{s:08d}").values()), (z, s)
        for key in ["fp32"] + (["exp_avg", "exp_avg_sq"] if z else []):
            before, skipped = _params(ck / f"step{BAD:08d}", key), _params(ck / f"step{BAD + 1:08d}", key)
            assert all(torch.equal(before[n], skipped[n]) for n in before), (z, key)
        assert (ck / "latest").read_text().strip() == f"step{STEPS:08d}"
        # the same as skipping that batch by construction, bitwise
        got, want = _params(a), _params(tmp_path / f"z{z}-constructed")
        assert sorted(got) == sorted(want)
        diff = [n for n in got if not torch.equal(got[n], want[n])]
        assert not diff, (z, diff[:5])
        before_first = _params(ck / f"step{1:08d}")
        assert any(not torch.equal(before_first[n], got[n]) for n in got)     # training did move
