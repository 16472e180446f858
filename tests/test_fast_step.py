"""The faster step computes what the previous one did: no mask without padding, fused q/k/v,
the chunked loss (single process and vocabulary-parallel), against the previous code kept here.

The previous path (three projections, a mask on every batch, fp32 logits of every target token
through F.cross_entropy) is restored by swapping in the old Attention.forward and
Transformer.forward below; losses and every gradient must agree in fp32 to float tolerance.
"""
import copy
import dataclasses
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model.loss import linear_cross_entropy
from model.transformer import Attention, TransformerConfig as ModelConfig, Transformer, attention_mask
from reference import CrossEntropy
from parallel_utils import spawn

CFG = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                  n_decoder_layers=2, dropout=0.0, max_positions=32)


def _old_attention_forward(self, x, kv, mask=None, causal=False):
    B, T, _ = x.shape
    S = kv.shape[1]
    q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    k = self.k(kv).view(B, S, -1, self.head_dim).transpose(1, 2)
    v = self.v(kv).view(B, S, -1, self.head_dim).transpose(1, 2)
    p = self.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    return self.o(out.transpose(1, 2).reshape(B, T, -1))


def _old_forward(self, src_ids, src_mask, tgt_ids, labels=None):
    mask = src_mask[:, None, None, :]                       # a mask on every batch, padded or not
    x = self._embed(src_ids)
    for layer in self.encoder:
        x = layer(x, mask)
    memory = self.encoder_norm(x)
    y = self._embed(tgt_ids)
    for layer in self.decoder:
        y = layer(y, memory, mask)
    logits = self.logits(self.decoder_norm(y))
    if labels is None:
        return logits
    crit = CrossEntropy(n_classes=self.config.real_vocab_size, label_smoothing=self.criterion.label_smoothing)
    return crit(logits, labels)


@contextmanager
def previous_path():
    with mock.patch.object(Attention, "forward", _old_attention_forward), \
            mock.patch.object(Transformer, "forward", _old_forward):
        yield


def _batch(seed, padded, B=3, S=7, T=5):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 60, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    if padded:
        mask[1, 4:] = False
        src[1, 4:] = 0
    tgt = torch.randint(3, 60, (B, T + 1), generator=g)
    labels = tgt[:, 1:].clone()
    labels[2, 3:] = -100
    return src, mask, tgt[:, :-1], labels


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = model(*batch)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("norm,smoothing", [("pre", 0.0), ("post", 0.1)])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_equals_previous_path(norm, smoothing, padded):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CFG, norm=norm))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.criterion.label_smoothing = smoothing
    model.criterion.chunk = 4                                  # several chunks of the 15 tokens
    batch = _batch(1, padded)
    got, got_g = _loss_and_grads(model, batch)
    with previous_path():
        want, want_g = _loss_and_grads(model, batch)
        want_logits = model(*batch[:3])
    assert_close(got, want, rtol=1e-6, atol=1e-6)
    for k in want_g:
        assert_close(got_g[k], want_g[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert_close(model(*batch[:3]), want_logits, rtol=1e-5, atol=1e-5)


def test_no_padding_means_no_mask():
    src, mask, *_ = _batch(1, padded=False)
    assert attention_mask(mask) is None and attention_mask(None) is None
    src, mask, *_ = _batch(1, padded=True)
    assert attention_mask(mask).shape == (3, 1, 1, 7)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask is None, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    torch.manual_seed(0)
    model = Transformer(CFG)
    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        model(*_batch(1, padded=False))
    # encoder self (2), decoder self (2, causal only) and cross (2): no mask anywhere
    assert seen == [(True, False)] * 2 + [(True, True), (True, False)] * 2, seen


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_equals_full_logits(smoothing):
    torch.manual_seed(0)
    N, D, V, K = 37, 16, 96, 90
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    bias = torch.zeros(V)
    bias[K:] = -1e9
    labels = torch.randint(0, K, (N,))
    labels[::5] = -100
    want = F.cross_entropy((F.linear(h, w) + bias)[:, :K], labels, reduction="sum", label_smoothing=smoothing)
    gh, gw = torch.autograd.grad(want, (h, w))
    for chunk in (1, 8, 37, 0):
        got = linear_cross_entropy(h, w, bias, labels, chunk=chunk, label_smoothing=smoothing, smooth_classes=K)
        ch, cw = torch.autograd.grad(got, (h, w))
        assert_close(got, want, rtol=1e-6, atol=1e-5)
        assert_close(ch, gh, rtol=1e-5, atol=1e-6)
        assert_close(cw, gw, rtol=1e-5, atol=1e-6)
    # bf16 autocast: the logits matmul runs in bf16 as in the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((F.linear(h, w) + bias)[:, :K].float(), labels, reduction="sum",
                               label_smoothing=smoothing)
        got = linear_cross_entropy(h, w, bias, labels, chunk=8, label_smoothing=smoothing, smooth_classes=K)
    assert_close(got, want, rtol=1e-3, atol=1e-2)
    gh, gw = torch.autograd.grad(want, (h, w))
    ch, cw = torch.autograd.grad(got, (h, w))
    assert_close(ch, gh, rtol=2e-2, atol=2e-2)
    assert_close(cw, gw, rtol=2e-2, atol=2e-2)


def test_loss_peak_memory_is_a_fraction_of_full_logits():
    from bench.measure import PeakMemory
    torch.manual_seed(0)
    N, D, V = 1024, 64, 16384                 # full fp32 logits: 64 MiB
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    peaks, grads = {}, {}
    for name in ("full", "chunked"):
        with PeakMemory() as pm:
            if name == "full":
                loss = CrossEntropy()(F.linear(h, w)[None], labels[None])[0]
            else:
                loss = linear_cross_entropy(h, w, None, labels, chunk=128)
            grads[name] = torch.autograd.grad(loss, (h, w))
        peaks[name] = pm.peak
        grads[name] = (loss.detach(),) + grads[name]
    for a, b in zip(grads["full"], grads["chunked"]):
        assert_close(b, a, rtol=1e-5, atol=1e-5)
    full_logits = N * V * 4
    assert peaks["full"] >= 2 * full_logits, peaks                   # logits, softmax/gradient, ...
    assert peaks["chunked"] < 0.25 * peaks["full"], peaks


# ----------------------------------------------------------------------------- tensor parallel

def _tp_worker(rank, world):
    from launcher.parallel import ParallelDims, parallelize
    from parallel_utils import gather_full_state_dict
    mesh = ParallelDims(tp=world, dp=1, world_size=world).build(rank)
    torch.manual_seed(0)
    ref = Transformer(CFG)
    ref.criterion.label_smoothing = 0.1
    tp = parallelize(copy.deepcopy(ref), mesh)
    tp.criterion.chunk = 4
    for padded in (False, True):
        batch = _batch(2, padded)
        with previous_path():
            want, want_g = _loss_and_grads(ref, batch)
        got, got_g = _loss_and_grads(tp, batch)
        assert_close(got, want, rtol=1e-6, atol=1e-5)
        full = gather_full_state_dict(tp, mesh, got_g)
        for k in want_g:
            assert_close(full[k], want_g[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"tp {k}: {m}")


def test_tp2_fast_path_equals_previous_path():
    spawn(_tp_worker, 2)
