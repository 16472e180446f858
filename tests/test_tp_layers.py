"""Each tensor-parallel layer, and the whole Transformer, against the unsharded reference.

Every rank builds the same reference module from the same seed, builds its sharded copy from
it, runs both, and compares its shard (outputs, input and weight gradients) with the matching
slice of the reference; the whole model's gradients are gathered and merged to full shapes.
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from launcher.parallel import ParallelDims, parallelize, shard_dims
from launcher.parallel.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  VocabParallelLinearCrossEntropy, clip_grad_norm_tp, copy_to_tp)
from model.transformer import Transformer, TransformerConfig as ModelConfig
from parallel_utils import gather_full_state_dict, merge_tp_state_dicts, spawn, split_state_dict

TOL = dict(rtol=1e-6, atol=1e-6)


def _slice(t, dim, r, n):
    k = t.shape[dim] // n
    return t.narrow(dim, r * k, k)


def _check_layers(r, n, g):
    torch.manual_seed(0)
    # ColumnParallelLinear: x (B, T, 8) -> y (B, T, 12/n)
    ref = nn.Linear(8, 12)
    x = torch.randn(3, 4, 8, requires_grad=True)
    w_out = torch.randn(3, 4, 12)
    (ref(x) * w_out).sum().backward()
    col = ColumnParallelLinear(copy.deepcopy(ref), g)
    x2 = x.detach().clone().requires_grad_()
    y = col(x2)
    assert y.shape == (3, 4, 12 // n) and col.weight.tensor_model_parallel and col.bias.tensor_model_parallel
    assert_close(y, _slice(ref(x), -1, r, n), **TOL)
    (y * _slice(w_out, -1, r, n)).sum().backward()
    assert_close(x2.grad, x.grad, **TOL)                        # all-reduced over TP in backward
    assert_close(col.weight.grad, _slice(ref.weight.grad, 0, r, n), **TOL)
    assert_close(col.bias.grad, _slice(ref.bias.grad, 0, r, n), **TOL)

    # RowParallelLinear: x (B, T, 12/n) sharded -> y (B, T, 8) replicated, bias added once
    ref = nn.Linear(12, 8)
    nn.init.normal_(ref.bias)
    x = torch.randn(3, 4, 12, requires_grad=True)
    w_out = torch.randn(3, 4, 8)
    (ref(x) * w_out).sum().backward()
    row = RowParallelLinear(copy.deepcopy(ref), g)
    x2 = _slice(x.detach(), -1, r, n).clone().requires_grad_()
    y = row(x2)
    assert not getattr(row.bias, "tensor_model_parallel", False) and row.weight.tensor_model_parallel
    assert_close(y, ref(x), **TOL)
    (y * w_out).sum().backward()
    assert_close(x2.grad, _slice(x.grad, -1, r, n), **TOL)
    assert_close(row.weight.grad, _slice(ref.weight.grad, 1, r, n), **TOL)
    assert_close(row.bias.grad, ref.bias.grad, **TOL)

    # VocabParallelEmbedding: every id, including the first and last row of each shard
    ref = nn.Embedding(16, 6)
    ids = torch.tensor([[0, 3, 4, 7, 8, 15], [11, 12, 12, 1, 5, 9]])
    w_out = torch.randn(2, 6, 6)
    (ref(ids) * w_out).sum().backward()
    emb = VocabParallelEmbedding(copy.deepcopy(ref), g)
    out = emb(ids)
    assert_close(out, ref(ids), **TOL)
    (out * w_out).sum().backward()
    assert_close(emb.weight.grad, _slice(ref.weight.grad, 0, r, n), **TOL)

    # Vocab-parallel cross-entropy from hidden states (chunked, 3 tokens per chunk) vs
    # F.cross_entropy on the full logits h W^T, with ignored tokens and label smoothing
    h_full = torch.randn(10, 8)
    w_full = torch.randn(16, 8)
    labels = torch.tensor([0, 15, 7, 8, -100, 3, 12, -100, 4, 11])

    def both(eps, k=None, bias=None):
        h, w = h_full.clone().requires_grad_(), w_full.clone().requires_grad_()
        logits = F.linear(h, w) + (bias if bias is not None else 0)
        want = F.cross_entropy(logits[:, :k] if k else logits, labels, ignore_index=-100, reduction="sum",
                               label_smoothing=eps)
        want.backward()
        h2, w2 = h_full.clone().requires_grad_(), _slice(w_full, 0, r, n).clone().requires_grad_()
        crit = VocabParallelLinearCrossEntropy(g, r * (16 // n), 16, label_smoothing=eps, smooth_classes=k, chunk=3)
        got, count = crit(copy_to_tp(h2, g), w2, None if bias is None else _slice(bias, 0, r, n), labels)
        assert count == 8
        assert_close(got, want, **TOL)
        (got * 0.5).backward()
        assert_close(h2.grad, h.grad * 0.5, **TOL)                # all-reduced over TP in backward
        assert_close(w2.grad, _slice(w.grad, 0, r, n) * 0.5, **TOL)

    for eps in (0.0, 0.1):
        both(eps)
    # smoothing over the real vocabulary only (ids < 13; the padded columns biased to -1e9 as in the model)
    labels[labels >= 13] = 5
    both(0.1, k=13, bias=torch.cat([torch.zeros(13), torch.full((3,), -1e9)]))


def _batch(c, seed):
    g = torch.Generator().manual_seed(seed)
    B, S, T = 3, 7, 5
    src = torch.randint(2, c.vocab_size, (B, S), generator=g)
    src_mask = torch.ones(B, S, dtype=torch.bool)
    src_mask[1, 5:] = False
    src_mask[2, 3:] = False
    tgt = torch.randint(2, c.real_vocab_size, (B, T + 1), generator=g)
    labels = tgt[:, 1:].clone()
    labels[1, 3:] = -100
    labels[2, 1:] = -100
    return src, src_mask, tgt[:, :-1], labels


def _check_model(r, n, g, mesh, norm, dropout, ckpt):
    c = ModelConfig(vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2,
                    n_decoder_layers=2, norm=norm, dropout=dropout)
    torch.manual_seed(1)
    ref = Transformer(c)
    with torch.no_grad():       # non-zero biases and LayerNorm affine, so their gradients are tested too
        for name, p in ref.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    tp = parallelize(copy.deepcopy(ref), mesh, activation_checkpointing=ckpt)
    assert tp.embed.weight.shape == (64 // n, 32) and tp.encoder[0].self_attn.q.out_features == 32 // n
    src, src_mask, tgt_in, labels = _batch(c, 2)
    torch.manual_seed(3)        # dropout masks: the same RNG stream on every TP rank and in the reference
    want, want_n = ref(src, src_mask, tgt_in, labels)
    want.backward()
    torch.manual_seed(3)
    got, got_n = tp(src, src_mask, tgt_in, labels)
    got.backward()
    assert got_n == want_n == 9
    assert_close(got, want, rtol=1e-6, atol=1e-5)
    grads = {k: p.grad for k, p in tp.named_parameters()}
    full = gather_full_state_dict(tp, mesh, grads)
    for k, p in ref.named_parameters():
        assert_close(full[k], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{norm} {k}: {m}")
    # the trainer's ZeRO-0 gradient norm: sharded parts summed over the group, replicated once
    want_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    assert_close(clip_grad_norm_tp(tp.parameters(), float("inf"), g), want_norm, rtol=1e-5, atol=0)
    # replicated gradients are bitwise identical on the TP ranks, so replicated weights never drift
    per_rank = [None] * n
    dist.all_gather_object(per_rank, grads, group=g)
    merged = merge_tp_state_dicts(per_rank, shard_dims(tp), check_replicated=True)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    # logits: the local vocabulary columns of the reference's, padded rows pushed to -1e9
    if dropout == 0:
        with torch.no_grad():
            assert_close(tp(src, src_mask, tgt_in), _slice(ref(src, src_mask, tgt_in), -1, r, n), rtol=1e-5, atol=1e-5)


def _check_state_dict(r, n, g, mesh):
    c = ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)
    ref = Transformer(c)
    full_sd = ref.state_dict()
    tp = parallelize(copy.deepcopy(ref), mesh)
    local = tp.state_dict()
    assert list(local) == list(full_sd)                          # same keys as the unsharded model
    dims = shard_dims(tp)
    for k, t in split_state_dict(full_sd, dims, r, n).items():
        assert torch.equal(t, local[k]), k
    gathered = gather_full_state_dict(tp, mesh)
    shards = [split_state_dict(full_sd, dims, i, n) for i in range(n)]
    for sd in (gathered, merge_tp_state_dicts(shards, dims)):
        assert all(torch.equal(sd[k], full_sd[k]) for k in full_sd)


def _worker(rank, world, models):
    mesh = ParallelDims(tp=world, dp=1, world_size=world).build(rank)
    g = mesh.tp_group
    _check_layers(mesh.tp_rank, world, g)
    if models:
        _check_model(mesh.tp_rank, world, g, mesh, "pre", 0.0, False)
        _check_model(mesh.tp_rank, world, g, mesh, "post", 0.0, False)
        _check_model(mesh.tp_rank, world, g, mesh, "pre", 0.1, True)   # dropout + activation checkpointing
        _check_state_dict(mesh.tp_rank, world, g, mesh)


def test_tp2_layers_and_transformer():
    spawn(_worker, 2, True)


def test_tp4_layers():
    spawn(_worker, 4, False)
