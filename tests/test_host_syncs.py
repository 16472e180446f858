"""Host synchronisations per training step, counted in the real loop (so the count cannot creep back).

2 gloo ranks (dp 2), loader workers 1, dropout 0.1, ZeRO 0-3, the real Trainer from the training
entry on the tiny prepared data; every call that reads a tensor's value into Python or synchronizes
a stream is counted (bench/measure.py HostSyncs) from the first step to the last, outside checkpoint
saves. Per optimizer step the project's code reads the device exactly once (the step guard's
verdict: the global loss, the stop requests, without ZeRO the gradient norm); a logging step adds
exactly one (its metrics). DeepSpeed's own ZeRO step adds its overflow check (at most 3 reads;
at ZeRO 3 after the first two steps, in which DeepSpeed records and cross-checks its parameter-fetch trace).
"""
import pytest
import sys
if "dbg" in sys.argv[0]: pass

from ckpt_helpers import run_ranks, trainer

STEPS, LOG_EVERY = 6, 3


def _count(data, out, stage):
    from bench.measure import HostSyncs
    t = trainer(data, out, f"parallel.zero_stage={stage}", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
                "model.dropout=0.1", "data.num_workers=1", "train.precision=bf16", "checkpoint.every=0")
    syncs = HostSyncs().install()
    per_step, save = [], t.save_checkpoint
    inner = t.train_step

    def step(batches):
        if per_step or syncs.counts:                  # the previous step, with its logging
            per_step.append(syncs.take())
        syncs.active = True
        return inner(batches)

    def saving():
        with syncs.paused():
            return save()
    t.train_step, t.save_checkpoint = step, saving
    try:
        t.train()
    finally:
        syncs.active = False
        syncs.uninstall()
    per_step.append(syncs.take())
    return per_step


def _worker(data, base):
    return {z: _count(data, f"{base}/z{z}", z) for z in (0, 1, 2, 3)}


@pytest.mark.slow
def test_one_host_read_per_step_and_one_per_logging_step(tiny_pairs, tmp_path):
    res = run_ranks(2, _worker, tiny_pairs["train"], str(tmp_path), tmp=str(tmp_path))
    for z, steps in res.items():
        assert len(steps) == STEPS, (z, steps)
        for i, counts in enumerate(steps, 1):
            ours = {k: v for k, v in counts.items() if k.startswith("project:")}
            want = {"project:_verdict": 1} | ({"project:_reduce": 1} if i % LOG_EVERY == 0 else {})
            assert ours == want, (f"zero {z} step {i}", counts)
            if int(z) < 3 or i > 2:
                assert counts.get("deepspeed", 0) <= (3 if int(z) else 0), (f"zero {z} step {i}", counts)
            assert not counts.get("other"), (f"zero {z} step {i}", counts)
