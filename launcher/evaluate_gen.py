"""Generation quality during evaluation: greedy decoding of a few samples and corpus BLEU / chrF.

score() uses sacrebleu with its defaults (BLEU: 13a tokenisation, exponential smoothing; chrF:
character 6-grams, beta 2), on detokenised text, one reference per hypothesis.
greedy_generate() decodes with the plain model (no KV cache: each step re-runs the decoder on
the prefix, which is fine for the handful of samples logged as an eval table).
"""
from __future__ import annotations

import torch


def score(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """{"bleu": corpus BLEU, "chrf": corpus chrF}, both on a 0-100 scale."""
    import sacrebleu
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"score: {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("score: no hypotheses to score")
    bad = next((i for i, x in enumerate(hyps + refs) if not isinstance(x, str)), None)
    if bad is not None:
        side, idx = ("hypothesis", bad) if bad < len(hyps) else ("reference", bad - len(hyps))
        raise ValueError(f"score: {side} {idx} is {type((hyps + refs)[bad]).__name__}, not str")
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}


def greedy_generate(model, src_ids: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> list[list[int]]:
    """Greedy decoding (model.generate.greedy): (B, S) source -> B lists of generated ids, without the
    start token, cut after the first eos (kept)."""
    from model.generate import greedy
    c = model.config
    was_training = model.training
    model.eval()
    try:
        ys = greedy(model, src_ids, src_mask, max_new_tokens=max_len)
    finally:
        model.train(was_training)
    out = []
    for row in ys[:, 1:].tolist():
        out.append(row[:row.index(c.eos_id) + 1] if c.eos_id in row else row)
    return out
