"""The tensor-parallel plan of model.arch=t5 (model/t5.py), applied from outside as for the Transformer.

    T5Attention       q, k, v -> ColumnParallelLinear (this rank's heads), o -> RowParallelLinear;
                      relative_attention_bias (buckets, H) -> its columns of this rank's heads, so the
                      bias the first layer computes is (1, H/tp, T, S), the heads every layer holds
    GatedFeedForward  wi_0, wi_1 -> ColumnParallelLinear (one input copy for both), wo -> RowParallelLinear
    embed             -> VocabParallelEmbedding
    lm_head           -> ColumnParallelLinear (this rank's vocabulary columns); tied: through embed
    criterion         -> VocabParallelLinearCrossEntropy over the whole padded vocabulary (as T5's
                         loss), chunked over tokens from h and the output weight (untied lm_head or embed)

Replicated activations are copied into the TP region once per consumer group (their gradient
all-reduced in backward): each attention's input, each FFN's input, the encoder output (for
every cross-attention's k/v) and the decoder output (for the output projection).
"""
from __future__ import annotations

import torch.nn as nn

from launcher.parallel.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, _shard,
                                  copy_output_hook, copy_to_tp, mark_tp_param, shard_attention,
                                  vocab_parallel_criterion)
from launcher.parallel.rng import tp_local_rng
from model.t5 import GatedFeedForward, T5Attention

# (module class, child linear, partition dim of its weight); T5 has no linear biases
PLAN = [(T5Attention, "q", 0), (T5Attention, "k", 0), (T5Attention, "v", 0), (T5Attention, "o", 1),
        (GatedFeedForward, "wi_0", 0), (GatedFeedForward, "wi_1", 0), (GatedFeedForward, "wo", 1)]
BIAS_TABLE = "relative_attention_bias"


def shard_dims(model: nn.Module) -> dict[str, int]:
    """State-dict key -> dimension split across TP ranks (the same before and after the plan)."""
    dims = {"embed.weight": 0}
    if model.lm_head is not None:
        dims["lm_head.weight"] = 0
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for cls, child, dim in PLAN:
            if isinstance(m, cls):
                dims[f"{prefix}{child}.weight"] = dim
        if isinstance(m, T5Attention) and hasattr(m, BIAS_TABLE):
            dims[f"{prefix}{BIAS_TABLE}.weight"] = 1
    return dims


def _copy_inputs(group, copy_kv: bool):
    def hook(module, args):
        x = copy_to_tp(args[0], group)
        if len(args) == 1:
            return (x,)
        kv = x if args[1] is args[0] else (copy_to_tp(args[1], group) if copy_kv else args[1])
        return (x, kv, *args[2:])
    return hook


def _shard_table(emb: nn.Embedding, group) -> nn.Embedding:
    import torch.distributed as dist
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = nn.Embedding(emb.num_embeddings, emb.embedding_dim // world)
    out.weight = mark_tp_param(nn.Parameter(_shard(emb.weight, 1, rank, world, "relative attention bias"),
                                            emb.weight.requires_grad), 1)
    return out


def apply_tp(model: nn.Module, group) -> None:
    if isinstance(model.embed, VocabParallelEmbedding):
        raise ValueError("parallelize: the model is already tensor-parallel")
    for name, m in list(model.named_modules()):
        if isinstance(m, T5Attention):
            shard_attention(m, group)
            if hasattr(m, BIAS_TABLE):
                setattr(m, BIAS_TABLE, _shard_table(getattr(m, BIAS_TABLE), group))
            # positional (x, kv, mask) as the layers call it; cross-attention k/v read memory, copied once below
            m.register_forward_pre_hook(_copy_inputs(group, copy_kv=not name.endswith("cross_attn")))
            if m.dropout > 0:                           # dropout on this rank's heads: masks of its own
                tp_local_rng(m, group)
        elif isinstance(m, GatedFeedForward):
            m.wi_0 = ColumnParallelLinear(m.wi_0, group, copy_input=False)
            m.wi_1 = ColumnParallelLinear(m.wi_1, group, copy_input=False)
            m.wo = RowParallelLinear(m.wo, group)
            m.register_forward_pre_hook(_copy_inputs(group, copy_kv=False))
            if m.dropout.p > 0:                         # dropout on this rank's hidden columns
                tp_local_rng(m, group)
    emb = VocabParallelEmbedding(model.embed, group)
    model.embed = emb
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(model.lm_head, group, copy_input=False)
    model.encoder_norm.register_forward_hook(copy_output_hook(group))   # memory -> cross-attention k/v
    model.decoder_norm.register_forward_hook(copy_output_hook(group))   # h -> output projection
    model.criterion = vocab_parallel_criterion(model.criterion, emb, group)
