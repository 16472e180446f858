"""Complete state and exact resume: N steps straight == k steps, stop (a real SIGUSR1), resume, on to N.

Real DeepSpeed engines on 2 gloo ranks (dp=2, or tp=2), ZeRO 0-3, dropout on (so the RNG states
matter): the losses and gradient norms of steps k+1..N must be bitwise equal to the straight
run's. The step-k checkpoint is also inspected: it must hold every piece of state, listed and
checksummed, loadable without unpickling code.
"""
import json
import os

import pytest
import torch

from ckpt_helpers import metrics, run_ranks, train

N, K = 5, 2


def _exact(data, base, stages, tp):
    out = {}
    for z in stages:
        common = (f"parallel.zero_stage={z}", f"parallel.tp={tp}", f"train.steps={N}", "model.dropout=0.1",
                  "checkpoint.every=0", "parallel.zero_at_one_rank=true")   # tp 2: DeepSpeed's ZeRO at dp 1 too
        a, b = os.path.join(base, f"z{z}-straight"), os.path.join(base, f"z{z}-resumed")
        train(data, a, *common)
        t = train(data, b, *common, stop_after=K)
        stopped_at = t.step
        with open(os.path.join(b, "checkpoints", "latest")) as f:
            latest = f.read().strip()
        t = train(data, b, *common)
        out[z] = {"stopped_at": stopped_at, "latest": latest, "final_step": t.step,
                  "straight_tokens": metrics(a)[K]["tokens_seen"],
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
            assert r["resumed"][str(s)] == r["straight"][str(s)], (z, s, r["resumed"][str(s)], r["straight"][str(s)])
        # the steps before the stop are the same run too, and training moved the loss
        assert r["resumed"][str(1)] == r["straight"][str(1)]
        assert r["straight"][str(1)] != r["straight"][str(N)]
        _complete_state(tmp_path / f"z{z}-resumed" / "checkpoints" / f"step{K:08d}", int(z), tp, tiny_pairs["train"],
                        r["straight_tokens"])


def _complete_state(tag_dir, z, tp, data, tokens_at_k):
    st = json.loads((tag_dir / "trainer_state.json").read_text())
    dp = 2 // tp
    assert st["format"] == "deepspeed" and st["step"] == K and st["tokens_seen"] == tokens_at_k
    assert st["data"] == {"epoch": 0, "cursor": K * 8,                      # global batch 8 per step
                          "counters": {"bad_samples": 0, "packing": {"dropped_tokens": 0, "repeated_tokens": 0}}}
    assert st["layout"] == {"world_size": 2, "tp": tp, "dp": dp, "zero_stage": z}
    m = st["config"]["model"]                                                 # the effective config
    assert m["vocab_size"] == 360 and m["real_vocab_size"] == 359 and m["dropout"] == 0.1
    assert st["config"]["parallel"]["zero_stage"] == z and st["config"]["parallel"]["tp"] == tp
    assert st["scheduler"]["last_epoch"] == K and len(st["scheduler"]["_last_lr"]) == 2
    ds = [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)] if z < 3 else \
        [f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for d in range(dp) for r in range(tp)]
    if z > 0:
        ds += [f"zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt" for d in range(dp) for r in range(tp)]
    assert sorted(st["files"]) == sorted(ds + ["rng-rank0000.pt", "rng-rank0001.pt", "tokenizer.json"])
    assert sorted(os.listdir(tag_dir)) == sorted([*st["files"], "trainer_state.json"])
    for f, meta in st["files"].items():
        assert os.path.getsize(tag_dir / f) == meta["size"] and len(meta["sha256"]) == 64
    assert (tag_dir / "tokenizer.json").read_bytes() == open(os.path.join(data, "tokenizer.json"), "rb").read()
    for r in range(2):
        rng = torch.load(tag_dir / f"rng-rank{r:04d}.pt", weights_only=True)
        assert set(rng) >= {"python", "numpy", "torch"}
    if z == 0:
        assert st["optimizer_param_names"] and sum(map(len, st["optimizer_param_names"])) == 89
