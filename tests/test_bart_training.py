"""model.arch=bart with data.objective=bart in the real trainer (DeepSpeed engines, gloo ranks, a
loader worker per rank, real tar shards of sentences) against one process.

tp2 x dp2 with ZeRO 2: the same losses, gradient norms (clipping active in every step) and final
parameters as one process; tp2 x dp2 with ZeRO 3 and every dropout on (residual, attention,
activation: the TP-sharded ones on private streams): a run stopped by a signal at step K resumes
exactly; the ZeRO-2 run exports to a BartForConditionalGeneration computing the trained model's logits.
"""
import os

import pytest
import torch
from ckpt_helpers import consolidated, metrics, run_ranks, train

from tests.test_bart_objective import bart_text  # noqa: F401 - the fixture

BART = ("model.arch=bart", "data.objective=bart", "data.max_src_len=24", "data.max_tgt_len=24", "data.num_workers=1")
COMMON = (*BART, "train.steps=5", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
          "optim.grad_clip=0.3", "optim.lr=3e-3", "checkpoint.every=0")
DROPOUT = ("model.dropout=0.1", "model.attention_dropout=0.1", "model.activation_dropout=0.1")
N, K = 5, 2


def _runs(data, base, runs):
    """name -> {step: [loss, grad norm]}; a "NAME-stopped" run (stopped by SIGUSR1 after step K, in
    NAME's folder, which the run NAME then resumes) -> the step it stopped at."""
    out = {}
    for name, over in runs:
        stopped = name.endswith("-stopped")
        t = train(data, os.path.join(base, name.removesuffix("-stopped")), *COMMON, *over,
                  stop_after=K if stopped else None)
        out[name] = t.step if stopped else {s: [r["loss"], r["grad_norm"]]
                                            for s, r in metrics(os.path.join(base, name)).items()}
    return out


@pytest.mark.slow
def test_bart_tp2_dp2_equals_one_process_and_resumes_exactly(bart_text, tmp_path):  # noqa: F811
    base = str(tmp_path)
    tp2dp2, z3 = ("parallel.tp=2", "parallel.zero_stage=2"), ("parallel.tp=2", "parallel.zero_stage=3")
    ref = run_ranks(1, _runs, bart_text, base, [("ref", ("parallel.zero_stage=0",))], tmp=base)["ref"]
    assert len(ref) == N and all(v[1] > 0.3 for v in ref.values()), ref           # clipping is active
    four = run_ranks(4, _runs, bart_text, base, [
        ("tp2dp2", tp2dp2), ("straight", (*z3, *DROPOUT)), ("resumed-stopped", (*z3, *DROPOUT)),
        ("resumed", (*z3, *DROPOUT))], tmp=base)
    for s in ref:
        assert four["tp2dp2"][s][0] == pytest.approx(ref[s][0], rel=1e-5, abs=1e-5), (s, four["tp2dp2"][s], ref[s])
        assert four["tp2dp2"][s][1] == pytest.approx(ref[s][1], rel=1e-5), (s, four["tp2dp2"][s], ref[s])
    cfg, got = consolidated(os.path.join(base, "tp2dp2"))                          # TP shards merged back
    _, want = consolidated(os.path.join(base, "ref"))
    assert got.keys() == want.keys() and "encoder_positions.weight" in got
    for k in want:
        if k.endswith("attn.k.bias"):       # softmax cancels it: Adam steps on rounding noise, bounded by lr
            assert (got[k] - want[k]).abs().max() <= 2 * 3e-3 * N, k
            continue
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # exact resume, ZeRO 3, dropout on: steps K+1..N bitwise equal to the straight run's
    straight, resumed = four["straight"], four["resumed"]
    assert four["resumed-stopped"] == K
    assert sorted(resumed) == sorted(straight) and len(straight) == N
    for s in straight:
        assert resumed[s] == straight[s], (s, resumed[s], straight[s])
    assert straight["1"] != four["tp2dp2"]["1"]                                    # dropout was on
    # the trained model exports: BartForConditionalGeneration computes our logits
    from transformers import BartForConditionalGeneration
    from launcher.hf.export import convert
    from model import build
    convert(os.path.join(base, "tp2dp2"), os.path.join(base, "hf"), progress=False)
    ours = build(cfg.model).eval()
    ours.load_state_dict(got)
    hf = BartForConditionalGeneration.from_pretrained(os.path.join(base, "hf")).eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, cfg.model.real_vocab_size, (2, 20), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 12:] = False
    tgt = torch.randint(3, cfg.model.real_vocab_size, (2, 9), generator=g)
    with torch.no_grad():
        diff = ours(src, mask, tgt) - hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
    assert diff[..., :cfg.model.real_vocab_size].abs().max().item() < 1e-4
