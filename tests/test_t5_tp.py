"""model.arch=t5 under the tensor-parallel plan against the unsharded model (gloo ranks, CPU fp32).

The relative-bias table is sharded by head, the gated FFN column/row, embedding and untied head by
vocabulary: loss, every gradient (gathered to full shapes) and the logits must match one process.
"""
import copy

import torch
import torch.distributed as dist
from torch.testing import assert_close

from launcher.parallel import ParallelDims, parallelize, shard_dims
from model import build, make_config as ModelConfig
from parallel_utils import gather_full_state_dict, merge_tp_state_dicts, spawn, split_state_dict


def _cfg(tied):
    return ModelConfig(arch="t5", vocab_size=64, real_vocab_size=60, d_model=32, n_heads=4, head_dim=6, d_ff=48,
                       n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, layer_norm_eps=1e-6,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16, tie_embeddings=tied)


def _batch(c):
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, c.real_vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 8:] = False
    mask[2, 4:] = False
    tgt = torch.randint(3, c.real_vocab_size, (3, 9), generator=g)
    labels = tgt[:, 1:].clone()
    labels[2, 3:] = -100
    return src, mask, tgt[:, :-1], labels


def _check(r, n, mesh, tied, ckpt):
    c = _cfg(tied)
    torch.manual_seed(1)
    ref = build(c)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    tp = parallelize(copy.deepcopy(ref), mesh, activation_checkpointing=ckpt)
    table = tp.encoder[0].self_attn.relative_attention_bias.weight
    assert table.shape == (8, 4 // n) and table.tensor_model_parallel and table.partition_dim == 1
    assert tp.encoder[0].ffn.wi_1.weight.shape == (48 // n, 32)
    src, mask, tgt, labels = _batch(c)
    want, want_n = ref(src, mask, tgt, labels)
    want.backward()
    got, got_n = tp(src, mask, tgt, labels)
    got.backward()
    assert got_n == want_n
    assert_close(got, want, rtol=1e-6, atol=1e-5)
    grads = {k: p.grad for k, p in tp.named_parameters()}
    full = gather_full_state_dict(tp, mesh, grads)
    for k, p in ref.named_parameters():       # T5's unscaled embeddings give large gradients: tolerance by scale
        assert_close(full[k], p.grad, rtol=1e-5, atol=5e-6 * max(1.0, p.grad.abs().max().item()),
                     msg=lambda m: f"tied={tied} {k}: {m}")
    per_rank = [None] * n
    dist.all_gather_object(per_rank, grads, group=mesh.tp_group)
    merged = merge_tp_state_dicts(per_rank, shard_dims(tp), check_replicated=True)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    with torch.no_grad():
        k = 64 // n
        assert_close(tp(src, mask, tgt), ref(src, mask, tgt)[..., r * k:(r + 1) * k], rtol=1e-5, atol=1e-5)
    # state dict: the same keys, split and merged back exactly
    dims = shard_dims(tp)
    with torch.device("meta"):
        assert dims == shard_dims(build(c))
    full_sd = ref.state_dict()
    assert list(tp.state_dict()) == list(full_sd)
    for key, t in split_state_dict(full_sd, dims, r, n).items():
        assert torch.equal(t, tp.state_dict()[key]), key


def _worker(rank, world):
    mesh = ParallelDims(tp=world, dp=1, world_size=world).build(rank)
    _check(mesh.tp_rank, world, mesh, tied=False, ckpt=False)
    _check(mesh.tp_rank, world, mesh, tied=True, ckpt=True)


def test_t5_tp2_equals_one_process():
    spawn(_worker, 2)
