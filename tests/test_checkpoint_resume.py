"""Exact resume: N steps straight == k steps, stop (a real SIGUSR1), resume, on to N.

Real DeepSpeed engines on 2 gloo ranks (dp=2, or tp=2), ZeRO 0-3, dropout on (so the RNG states matter): the
losses and gradient norms of steps k+1..N must be bitwise equal to the straight run's.
"""
import os

import pytest

from ckpt_helpers import metrics, run_ranks, train

N, K = 5, 2


def _exact(data, base, stages, tp):
    out = {}
    for z in stages:
        common = (f"parallel.zero_stage={z}", f"parallel.tp={tp}", f"train.steps={N}", "model.dropout=0.1",
                  "checkpoint.every=0")
        a, b = os.path.join(base, f"z{z}-straight"), os.path.join(base, f"z{z}-resumed")
        train(data, a, *common)
        t = train(data, b, *common, stop_after=K)
        stopped_at = t.step
        with open(os.path.join(b, "checkpoints", "latest")) as f:
            latest = f.read().strip()
        t = train(data, b, *common)
        out[z] = {"stopped_at": stopped_at, "latest": latest, "final_step": t.step,
                  "straight": {s: [r["loss"], r["grad_norm"]] for s, r in metrics(a).items()},
                  "resumed": {s: [r["loss"], r["grad_norm"]] for s, r in metrics(b).items()}}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_exact_resume_zero_0_to_3(tiny_pairs, tmp_path, tp):
    res = run_ranks(2, _exact, tiny_pairs["train"], str(tmp_path), [0, 1, 2, 3], tp, tmp=str(tmp_path))
    for z, r in res.items():
        assert r["stopped_at"] == K and r["latest"] == f"step{K:08d}" and r["final_step"] == N, (z, r)
        for s in range(K + 1, N + 1):
            assert r["resumed"][str(s)] == r["straight"][str(s)], f"ZeRO-{z} step {s}: {r['resumed'][str(s)]} != {r['straight'][str(s)]}"
        # the steps before the stop are the same run too, and training moved the loss
        assert r["resumed"][str(1)] == r["straight"][str(1)]
        assert r["straight"][str(1)] != r["straight"][str(N)]
