"""Export from any layout: ZeRO 0-3 x TP 1, 2, 4, 8 -> a Hugging Face folder with the same logits.

Each layout trains 2 steps with real DeepSpeed engines; the *live* engine's logits on a fixed
batch (gathered over the TP ranks) are the reference. The checkpoint is then converted offline
in this process (launcher.hf.export) and loaded by stock transformers, whose logits must match.
"""
import os

import pytest
import torch
import torch.distributed as dist
from ckpt_helpers import run_ranks, train

STEPS = 2


def fixed_batch(real_vocab: int):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, real_vocab, (3, 9), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 6:] = False
    src[1, 6:] = 0
    tgt = torch.randint(3, real_vocab, (3, 6), generator=g)
    tgt[:, 0] = 0
    return src, mask, tgt


def _train_and_logits(data, base, tp, stages, extra):
    outs = []
    for z in stages:
        out = os.path.join(base, f"tp{tp}-z{z}")
        t = train(data, out, f"parallel.tp={tp}", f"parallel.zero_stage={z}", f"train.steps={STEPS}",
                  "train.micro_batch_size=2", "optim.lr=3e-3", *extra)
        src, mask, tgt = fixed_batch(t.cfg.model.real_vocab_size)
        t.engine.eval()
        with torch.no_grad():
            logits = t.engine(src, mask, tgt)                     # (B, T, V / tp) on each TP rank
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=t.mesh.tp_group)
            logits = torch.cat(parts, dim=-1)
        if t.env.rank == 0:
            torch.save(logits, os.path.join(out, "live_logits.pt"))
        outs.append(out)
    return outs


def _check_export(run_dir: str, tmp: str) -> float:
    from transformers import AutoModelForSeq2SeqLM
    from launcher.hf.export import convert
    hf_dir = os.path.join(tmp, os.path.basename(run_dir) + "-hf")
    convert(run_dir, hf_dir, progress=False)
    live = torch.load(os.path.join(run_dir, "live_logits.pt"), weights_only=True)
    hf = AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
    V = hf.config.vocab_size
    src, mask, tgt = fixed_batch(int((hf.final_logits_bias[0] == 0).sum()))
    with torch.no_grad():
        got = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
    assert got.shape == live.shape == (3, 6, V)
    real = int((hf.final_logits_bias[0] == 0).sum())
    diff = (got[..., :real] - live[..., :real]).abs().max().item()
    assert diff < 1e-4, (run_dir, diff)
    assert (got[..., real:] < -1e8).all()                       # padded vocabulary rows never predicted
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,stages,extra", [
    (2, 1, [0, 1, 2, 3], []),
    (2, 2, [0, 1, 2, 3], []),
    (4, 4, [1, 3], []),
    (8, 8, [2], ["model.n_heads=8"]),
], ids=["dp2-zero0123", "tp2-zero0123", "tp4-zero13", "tp8-zero2"])
def test_export_logits_parity(tiny_pairs, tmp_path, world, tp, stages, extra):
    outs = run_ranks(world, _train_and_logits, tiny_pairs["train"], str(tmp_path), tp, stages, extra,
                     tmp=str(tmp_path))
    for out in outs:
        d = _check_export(out, str(tmp_path))
        print(f"export {os.path.basename(out)}: max |logit diff| {d:.1e}")
