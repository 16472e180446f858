"""Generation quality: corpus BLEU / chrF of decoded hypotheses against references.

score() uses sacrebleu with its defaults (BLEU: 13a tokenisation, or sacrebleu's "zh" tokeniser
when the references contain CJK characters; exponential smoothing; chrF: character 6-grams,
beta 2), on detokenised text, one reference per hypothesis.
"""
from __future__ import annotations


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
    cjk = any("\u4e00" <= ch <= "\u9fff" for r in refs for ch in r)
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh" if cjk else "13a").score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}
