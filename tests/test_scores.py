"""BLEU/chrF against a hand computation; greedy decoding against teacher-forced argmax."""
import math

import pytest
import torch

from launcher.monitor.scores import score
from model.generate import greedy
from model.transformer import Transformer, TransformerConfig as ModelConfig


def greedy_generate(model, src_ids, src_mask, max_len: int) -> list[list[int]]:
    """model.generate.greedy in eval mode (the mode restored after): B lists of generated ids, without
    the start token, cut after the first eos (kept)."""
    c = model.config
    was_training = model.training
    model.eval()
    try:
        ys = greedy(model, src_ids, src_mask, max_new_tokens=max_len)
    finally:
        model.train(was_training)
    return [row[:row.index(c.eos_id) + 1] if c.eos_id in row else row for row in ys[:, 1:].tolist()]


def test_bleu_hand_computed():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (equal length: no brevity penalty)
    # clipped n-gram precisions: 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    s = score(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert s["bleu"] == pytest.approx(expected, abs=1e-6)       # 53.728...
    assert 0 < s["chrf"] < 100
    same = score(["a b c d e", "x y z w"], ["a b c d e", "x y z w"])
    assert same == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert score(["p q r s"], ["a b c d"])["bleu"] == pytest.approx(0.0, abs=1e-9)


def test_score_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        score([], [])
    with pytest.raises(ValueError, match="reference 1 is NoneType, not str"):
        score(["a", "b"], ["a", None])


def test_greedy_matches_teacher_forced_argmax():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, real_vocab_size=30, d_model=16, n_heads=2, d_ff=32,
                      n_encoder_layers=1, n_decoder_layers=2, dropout=0.1, max_positions=32)
    model = Transformer(cfg)
    model.train()
    src = torch.randint(2, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    src[1, 4:] = cfg.pad_id
    outs = greedy_generate(model, src, mask, max_len=8)
    assert model.training                                      # mode restored
    model.eval()
    for b, seq in enumerate(outs):
        assert 1 <= len(seq) <= 8 and all(t < cfg.real_vocab_size for t in seq)
        assert cfg.eos_id not in seq[:-1]
        tgt_in = torch.tensor([[cfg.decoder_start_id] + seq[:-1]])
        with torch.no_grad():
            logits = model(src[b:b + 1, :int(mask[b].sum())], mask[b:b + 1, :int(mask[b].sum())], tgt_in)
        assert logits[0].argmax(-1).tolist() == seq             # also: source padding changes nothing
