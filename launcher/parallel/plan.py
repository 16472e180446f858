"""parallelize(model, mesh): tensor parallelism applied to the Transformer from outside.

The plan (Megatron's split of a Transformer layer, heads and FFN columns across TP ranks):

    Attention    q, k, v -> ColumnParallelLinear   (this rank's heads; Attention reads the local
                 o       -> RowParallelLinear       head count from q.out_features)
    FeedForward  fc1     -> ColumnParallelLinear
                 fc2     -> RowParallelLinear
    embed        -> VocabParallelEmbedding; the tied output projection F.linear(h, embed.weight)
                    then yields this rank's vocabulary columns, and logits_bias is sliced to match
    criterion    -> VocabParallelLinearCrossEntropy (chunked over tokens from the hidden states;
                    never gathers, nor holds at once, the full-vocabulary logits)

Where replicated activations enter sharded weights, their gradient must be summed over the TP
group (copy_to_tp). That happens once per consumer group, not once per linear layer:
  - each Attention's query input (and its key/value input when it is the same tensor);
  - the encoder output (memory), once for the key/value projections of every cross-attention;
  - the decoder output h, before the tied output projection;
  - the FFN input, inside fc1.
Per layer this is the Megatron count: one all-reduce forward per row-parallel output, one
backward per sharded input group. With tp == 1 nothing is replaced and no collective is issued.
An Attention with attention dropout > 0 runs on a private RNG stream of its TP rank (rng.py), so
the heads of different ranks get independent masks while replicated activations keep identical ones.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from launcher.parallel.dims import Mesh
from launcher.parallel.rng import tp_local_rng
from launcher.parallel import plan_t5
from launcher.parallel.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_output_hook,
                                  copy_to_tp, shard_attention, vocab_parallel_criterion)
from model.transformer import Attention, FeedForward, Transformer


def _is_t5(model: nn.Module) -> bool:
    """model.arch=t5 has its own plan (plan_t5.py); the rest of this file is the Transformer's."""
    return getattr(getattr(model, "config", None), "arch", "transformer") == "t5"


# (module class, child linear, partition dim of its weight, is its bias sharded)
_PLAN = [
    (Attention, "q", 0, True), (Attention, "k", 0, True), (Attention, "v", 0, True), (Attention, "o", 1, False),
    (FeedForward, "fc1", 0, True), (FeedForward, "fc2", 1, False),
]


def shard_dims(model: nn.Module) -> dict[str, int]:
    """State-dict key -> dimension it is split along across TP ranks; keys not listed are replicated.

    The same for the unsharded and the parallelized model (the module paths do not change).
    """
    if _is_t5(model):
        return plan_t5.shard_dims(model)
    dims = {"embed.weight": 0}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for cls, child, dim, bias_sharded in _PLAN:
            if isinstance(m, cls):
                dims[f"{prefix}{child}.weight"] = dim
                if bias_sharded:
                    dims[f"{prefix}{child}.bias"] = 0
    return dims


# ----------------------------------------------------------------------------- applying the plan

def _attention_input_hook(group, copy_kv: bool):
    """Copies x (and kv, unless it was copied upstream) into the TP region once for q, k and v."""
    sig = inspect.signature(Attention.forward)

    def hook(module, args, kwargs):
        b = sig.bind(module, *args, **kwargs)
        x, kv = b.arguments["x"], b.arguments["kv"]
        cx = copy_to_tp(x, group)
        b.arguments["kv"] = cx if kv is x else (copy_to_tp(kv, group) if copy_kv else kv)
        b.arguments["x"] = cx
        return b.args[1:], b.kwargs
    return hook


def _apply_tp(model: Transformer, group) -> None:
    if isinstance(model.embed, VocabParallelEmbedding):
        raise ValueError("parallelize: the model is already tensor-parallel")
    for name, m in list(model.named_modules()):
        if isinstance(m, Attention):
            shard_attention(m, group)
            # cross-attention keys/values read the encoder output, copied once below
            m.register_forward_pre_hook(_attention_input_hook(group, copy_kv=not name.endswith("cross_attn")),
                                        with_kwargs=True)
            if m.dropout > 0:                           # dropout on this rank's heads: masks of its own
                tp_local_rng(m, group)
        elif isinstance(m, FeedForward):
            m.fc1 = ColumnParallelLinear(m.fc1, group)
            m.fc2 = RowParallelLinear(m.fc2, group)
    emb = VocabParallelEmbedding(model.embed, group)
    model.embed = emb
    lo, hi = emb.vocab_start, emb.vocab_start + emb.num_embeddings
    model.logits_bias = model.logits_bias[lo:hi].clone()          # stays a non-persistent buffer
    model.encoder_norm.register_forward_hook(copy_output_hook(group))   # memory -> cross-attn k/v
    model.decoder_norm.register_forward_hook(copy_output_hook(group))   # h -> tied output projection
    model.criterion = vocab_parallel_criterion(model.criterion, emb, group)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recomputes each encoder/decoder layer in backward (non-reentrant torch.utils.checkpoint).

    The layer's forward is wrapped in place, so parameter names and state-dict keys do not change.
    """
    for layer in (*model.encoder, *model.decoder):
        if getattr(layer, "_activation_checkpointing", False):
            continue

        def forward(*args, _inner=layer.forward, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        layer.forward = forward
        layer._activation_checkpointing = True


def compile_layers(model: Transformer) -> None:
    """torch.compile of each encoder/decoder layer's forward, in place (names and keys unchanged).

    The layer module itself stays eager, so hooks on it (DeepSpeed ZeRO-3's parameter gathering,
    with the layers marked as ZeRO-3 leaf modules by the trainer) run outside the compiled code;
    activation checkpointing, applied after, recomputes the compiled forward.
    """
    for layer in (*model.encoder, *model.decoder):
        if not getattr(layer, "_compiled", False):
            layer.forward = torch.compile(layer.forward)
            layer._compiled = True


def parallelize(model: Transformer, mesh: Mesh, activation_checkpointing: bool = False,
                compile: bool = False) -> Transformer:
    """Applies the TP plan (tp > 1), optional torch.compile of the layers and activation
    checkpointing, in place; returns the model.
    The layout was checked once, before any process group (dims.validate_layout)."""
    if mesh.tp > 1:
        (plan_t5.apply_tp if _is_t5(model) else _apply_tp)(model, mesh.tp_group)
    if compile:
        compile_layers(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model
