"""model.arch=t5 in the real trainer (DeepSpeed engines, gloo ranks) against one process.

tp2 x dp2 with ZeRO 2 and tp2 with ZeRO 3: the same losses and gradient norms (clipping active in
every step) as one process; tp2 ZeRO 2 resumes exactly (dropout on); a tp2 ZeRO-3 checkpoint
continues on dp1 ZeRO-0; the run exports to a T5ForConditionalGeneration computing the trained
model's logits.
"""
import os

import pytest
import torch
from ckpt_helpers import consolidated, metrics, run_ranks, train

T5 = ("model.arch=t5", "model.layer_norm_eps=1e-6", "model.relative_attention_num_buckets=8",
      "model.relative_attention_max_distance=16")
COMMON = (*T5, "train.steps=5", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
          "optim.grad_clip=0.3", "optim.lr=3e-3", "checkpoint.every=0")
N, K = 5, 2


def _runs(data, base, runs):
    out = {}
    for name, over in runs:
        stop = None
        if name.endswith("-stopped"):
            stop = K
        train(data, os.path.join(base, name.replace("-stopped", "-resumed")), *COMMON, *over, stop_after=stop)
    for name, _ in runs:
        d = os.path.join(base, name.replace("-stopped", "-resumed"))
        out[name] = {s: [r["loss"], r["grad_norm"]] for s, r in metrics(d).items()}
    return out


@pytest.mark.slow
def test_t5_tp_zero_layouts_equal_one_process(tiny_pairs, tmp_path):
    data, base = tiny_pairs["train"], str(tmp_path)
    ref = run_ranks(1, _runs, data, base, [("ref", ("parallel.zero_stage=0",))], tmp=base)["ref"]
    assert all(v[1] > 0.3 for v in ref.values()), ref                     # clipping is active
    four = run_ranks(4, _runs, data, base, [("tp2dp2-z2", ("parallel.tp=2", "parallel.zero_stage=2"))], tmp=base)
    two = run_ranks(2, _runs, data, base, [
        ("tp2-z3", ("parallel.tp=2", "parallel.zero_stage=3", f"checkpoint.every={K}", "checkpoint.keep=5")),
        ("straight", ("parallel.tp=2", "parallel.zero_stage=2", "model.dropout=0.1")),
        ("z2-stopped", ("parallel.tp=2", "parallel.zero_stage=2", "model.dropout=0.1")),
        ("z2", ("parallel.tp=2", "parallel.zero_stage=2", "model.dropout=0.1"))], tmp=base)
    for name, got in (("tp2dp2-z2", four["tp2dp2-z2"]), ("tp2-z3", two["tp2-z3"])):
        for s in ref:
            assert got[s][0] == pytest.approx(ref[s][0], rel=1e-5, abs=1e-5), (name, s, got[s], ref[s])
            assert got[s][1] == pytest.approx(ref[s][1], rel=1e-5), (name, s, got[s], ref[s])
    # exact resume: steps K+1..N bitwise equal to the straight run's (dropout on: RNG states restored)
    # another layout: the tp2 ZeRO-3 step-K checkpoint continues on dp1 ZeRO-0 (resharded: the bias table
    # and the untied head merged back), on the tp2-z3 run's losses
    ckpt = os.path.join(base, "tp2-z3", "checkpoints", f"step{K:08d}")
    dp1 = run_ranks(1, _runs, data, base, [("dp1", ("parallel.zero_stage=0", f"checkpoint.resume={ckpt}"))],
                    tmp=base)["dp1"]
    assert sorted(map(int, dp1)) == list(range(K + 1, N + 1))
    for s in dp1:
        assert dp1[s][0] == pytest.approx(two["tp2-z3"][s][0], rel=1e-5), (s, dp1[s], two["tp2-z3"][s])
    straight, resumed = two["straight"], two["z2"]
    assert sorted(resumed) == sorted(straight) and len(straight) == N
    for s in straight:
        assert resumed[s] == straight[s], (s, resumed[s], straight[s])
    assert straight["1"] != straight[str(N)]                           # keys: JSON from the ranks
    # the tp2 ZeRO-3 run exported: T5ForConditionalGeneration computes our trained model's logits
    from transformers import T5ForConditionalGeneration
    from launcher.hf.export import convert
    from model import build
    convert(os.path.join(base, "tp2-z3"), os.path.join(base, "hf"), progress=False)
    cfg, params = consolidated(os.path.join(base, "tp2-z3"))
    ours = build(cfg.model).eval()
    ours.load_state_dict(params)
    hf = T5ForConditionalGeneration.from_pretrained(os.path.join(base, "hf")).eval()
    assert hf.lm_head.weight is not hf.shared.weight
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 300, (2, 20), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 12:] = False
    tgt = torch.randint(3, 300, (2, 9), generator=g)
    with torch.no_grad():
        diff = (ours(src, mask, tgt) - hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits)
    assert diff.abs().max().item() < 1e-4

