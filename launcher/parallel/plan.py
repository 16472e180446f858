"""parallelize(model, mesh): tensor parallelism applied to any registered architecture from outside.

The plan is data each architecture declares (model/arch.py TPPlan): Megatron's split of a layer,
heads and FFN columns across TP ranks.

    sharded blocks   column children (q, k, v; fc1 / wi_0, wi_1) -> ColumnParallelLinear (this rank's
                     heads or hidden columns; attention reads its local head count from q.out_features),
                     row children (o; fc2 / wo) -> RowParallelLinear, head tables (T5's relative
                     attention bias) -> this rank's head columns
    embedding        -> VocabParallelEmbedding; a tied output projection F.linear(h, embed.weight)
                        then yields this rank's vocabulary rows, and (V,) vocabulary buffers
                        (the seed model's logits_bias) are sliced to match
    vocab heads      an untied output projection (T5's lm_head) -> ColumnParallelLinear over the vocabulary
    criterion        -> VocabParallelLinearCrossEntropy (chunked over tokens from the hidden states;
                        never gathers, nor holds at once, the full-vocabulary logits)

Where replicated activations enter sharded weights, their gradient must be summed over the TP
group (copy_to_tp). That happens once per consumer group, not once per linear layer:
  - each sharded block's replicated inputs (attention: x, and kv when it is not x; FFN: x);
  - the encoder output (memory), once for the key/value projections of every cross-attention;
  - the decoder output h, before the output projection.
Per layer this is the Megatron count: one all-reduce forward per row-parallel output, one
backward per sharded input group. With tp == 1 nothing is replaced and no collective is issued.
A block with dropout inside its sharded region (attention probabilities, a gated FFN's hidden
columns) runs on a private RNG stream of its TP rank (rng.py), so the heads of different ranks get
independent masks while replicated activations keep identical ones.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from launcher.parallel.dims import Mesh
from launcher.parallel.rng import tp_local_rng
from launcher.parallel.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, _shard,
                                  copy_output_hook, copy_to_tp, mark_tp_param, vocab_parallel_criterion)
from model import arch_of
from model.arch import ShardedBlock, TPPlan


def plan_of(model: nn.Module) -> TPPlan:
    return arch_of(model.config).tp_plan


def shard_dims(model: nn.Module) -> dict[str, int]:
    """State-dict key -> dimension it is split along across TP ranks; keys not listed are replicated.

    The same for the unsharded and the parallelized model (the module paths do not change).
    """
    return plan_of(model).shard_dims(model)


# ----------------------------------------------------------------------------- applying the plan

def _copy_inputs_hook(module: nn.Module, n_inputs: int, copy_kv: bool, group):
    """Copies the block's replicated inputs (its first n_inputs arguments) into the TP region once for
    all its column children; kv is reused when it is x, left alone when copied upstream."""
    sig = inspect.signature(module.forward)             # bound: no self
    params = list(sig.parameters)[:n_inputs]

    def hook(mod, args, kwargs):
        b = sig.bind(*args, **kwargs)
        x = b.arguments[params[0]]
        cx = copy_to_tp(x, group)
        b.arguments[params[0]] = cx
        if n_inputs > 1:
            kv = b.arguments[params[1]]
            b.arguments[params[1]] = cx if kv is x else (copy_to_tp(kv, group) if copy_kv else kv)
        return b.args, b.kwargs
    return hook


def _shard_table(emb: nn.Embedding, group) -> nn.Embedding:
    """An embedding whose columns are heads (T5's relative attention bias): this rank's columns."""
    import torch.distributed as dist
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = nn.Embedding(emb.num_embeddings, emb.embedding_dim // world)
    out.weight = mark_tp_param(nn.Parameter(_shard(emb.weight, 1, rank, world, "head table"),
                                            emb.weight.requires_grad), 1)
    return out


def _dropout_p(m: nn.Module, attr: str) -> float:
    d = getattr(m, attr, 0.0) if attr else 0.0
    return d.p if isinstance(d, nn.Dropout) else float(d)


def _shard_block(m: nn.Module, name: str, blk: ShardedBlock, group) -> None:
    for c in blk.columns:
        setattr(m, c, ColumnParallelLinear(getattr(m, c), group, copy_input=False))
    for c in blk.rows:
        setattr(m, c, RowParallelLinear(getattr(m, c), group))
    for c in blk.head_tables:
        if hasattr(m, c):
            setattr(m, c, _shard_table(getattr(m, c), group))
    copy_kv = not name.endswith(blk.kv_copied_upstream) if blk.kv_copied_upstream else True
    m.register_forward_pre_hook(_copy_inputs_hook(m, blk.inputs, copy_kv, group), with_kwargs=True)
    if _dropout_p(m, blk.dropout) > 0:                 # dropout on this rank's shard: masks of its own
        tp_local_rng(m, group)


def _apply_tp(model: nn.Module, plan: TPPlan, group) -> None:
    emb = getattr(model, plan.embedding)
    if isinstance(emb, VocabParallelEmbedding):
        raise ValueError("parallelize: the model is already tensor-parallel")
    for name, m in list(model.named_modules()):
        for blk in plan.blocks:
            if isinstance(m, blk.cls):
                _shard_block(m, name, blk, group)
    emb = VocabParallelEmbedding(emb, group)
    setattr(model, plan.embedding, emb)
    lo, hi = emb.vocab_start, emb.vocab_start + emb.num_embeddings
    for b in plan.vocab_buffers:                       # stays a non-persistent buffer
        setattr(model, b, getattr(model, b)[lo:hi].clone())
    for h in plan.vocab_heads:
        if getattr(model, h, None) is not None:
            setattr(model, h, ColumnParallelLinear(getattr(model, h), group, copy_input=False))
    for o in plan.copied_outputs:                      # memory -> cross-attention k/v; h -> output projection
        getattr(model, o).register_forward_hook(copy_output_hook(group))
    model.criterion = vocab_parallel_criterion(model.criterion, emb, group)


def apply_activation_checkpointing(model: nn.Module) -> None:
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


def compile_layers(model: nn.Module) -> None:
    """torch.compile of each encoder/decoder layer's forward, in place (names and keys unchanged).

    The layer module itself stays eager, so hooks on it (DeepSpeed ZeRO-3's parameter gathering,
    with the layers marked as ZeRO-3 leaf modules by the trainer) run outside the compiled code;
    activation checkpointing, applied after, recomputes the compiled forward.
    """
    for layer in (*model.encoder, *model.decoder):
        if not getattr(layer, "_compiled", False):
            layer.forward = torch.compile(layer.forward)
            layer._compiled = True


def compile_model(model: nn.Module) -> None:
    """torch.compile of the whole forward (embeddings, every layer, final norms and the chunked
    loss: one graph), in place. Against compiling layer by layer this also fuses the embedding,
    the norms between stacks and the loss's elementwise work, and launches fewer kernels (on an
    H200, transformer-base bf16: device time per step 38.6 ms eager, 29.2 ms layers, 23.9 ms whole;
    bench/profile_step.py). Activation checkpointing, applied before, is traced into the graph."""
    if not getattr(model, "_compiled", False):
        model.forward = torch.compile(model.forward)
        model._compiled = True


def compile_stacks(model: nn.Module) -> None:
    """torch.compile of the encoder stack, the decoder stack (each with its embedding) and the
    loss: three graphs, in place. What ZeRO 1-2 over several data-parallel ranks take instead of
    the whole forward (see launcher/training/engine.compile_scope)."""
    if not getattr(model, "_compiled", False):
        model.encode = torch.compile(model.encode)
        model.decode = torch.compile(model.decode)
        model.criterion.forward = torch.compile(model.criterion.forward)
        model._compiled = True


COMPILE_SCOPES = ("model", "stacks", "layers")


def parallelize(model: nn.Module, mesh: Mesh, activation_checkpointing: bool = False,
                compile: str = "") -> nn.Module:
    """Applies the TP plan (tp > 1), activation checkpointing and torch.compile ("model": the whole
    forward; "stacks": encoder, decoder and loss apart; "layers": each layer's, for ZeRO-3 whose
    hooks must stay outside compiled code; "": none), in place; returns the model.
    The layout was checked once, before any process group (dims.validate_layout)."""
    if compile and compile not in COMPILE_SCOPES:
        raise ValueError(f"compile must be one of {COMPILE_SCOPES} or empty, got {compile!r}")
    if mesh.tp > 1:
        _apply_tp(model, plan_of(model), mesh.tp_group)
    if compile == "layers":
        compile_layers(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile == "model":
        compile_model(model)
    elif compile == "stacks":
        compile_stacks(model)
    return model
