"""The Transformer itself: shapes, masking, causality, and that both norm layouts learn."""
import dataclasses

import pytest
import torch

from model import count_parameters
from model.transformer import Transformer, TransformerConfig as ModelConfig, sinusoid_table

CFG = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0, max_positions=32)


def _model(norm="pre", seed=0):
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(CFG, norm=norm)).eval()


def _batch(seed=1, B=3, S=7, T=5):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 60, (B, S), generator=g)
    tgt = torch.randint(3, 60, (B, T), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    src[1, 4:] = 0
    return src, mask, tgt


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_shapes_and_param_count(norm):
    m = _model(norm)
    src, mask, tgt = _batch()
    assert m(src, mask, tgt).shape == (3, 5, 64)
    assert sum(p.numel() for p in m.parameters()) == count_parameters(m.config)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_padded_source_tokens_do_not_matter(norm):
    m = _model(norm)
    src, mask, tgt = _batch()
    a = m(src, mask, tgt)
    src2 = src.clone()
    src2[1, 4:] = torch.tensor([5, 9, 11])          # change the padded positions only
    b = m(src2, mask, tgt)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    src3 = src.clone()
    src3[1, 2] = 13                                   # a real token does matter
    assert not torch.allclose(a[1], m(src3, mask, tgt)[1])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_future_target_tokens_do_not_change_earlier_outputs(norm):
    m = _model(norm)
    src, mask, tgt = _batch()
    a = m(src, mask, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 3] = (tgt2[:, 3] + 7) % 60
    b = m(src, mask, tgt2)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_padded_vocabulary_is_never_predicted():
    m = _model()
    src, mask, tgt = _batch()
    assert (m(src, mask, tgt)[..., 60:] < -1e8).all()


def test_sinusoid_layout_is_sin_half_then_cos_half():
    t = sinusoid_table(10, 8)
    pos, i = 3, 1
    angle = pos / 10000 ** (2 * i / 8)
    assert abs(t[pos, i] - torch.sin(torch.tensor(angle))) < 1e-6
    assert abs(t[pos, 4 + i] - torch.cos(torch.tensor(angle))) < 1e-6


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_both_layouts_lower_the_loss_on_a_fixed_batch(norm):
    m = _model(norm).train()
    src, mask, tgt = _batch(B=4)
    labels = torch.cat([tgt[:, 1:], torch.ones(4, 1, dtype=torch.long)], dim=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        s, n = m(src, mask, tgt, labels)
        loss = s / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
