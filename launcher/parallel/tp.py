"""Megatron-style tensor-parallel layers on plain tensors.

Four tiny autograd collectives over the TP group move activations between the replicated
region (every TP rank holds the same tensor) and the sharded region (each rank holds a slice):

    copy_to_tp      fwd: identity      bwd: all-reduce   (replicated input -> sharded weights)
    reduce_from_tp  fwd: all-reduce    bwd: identity     (partial sums -> replicated output)

    ColumnParallelLinear  W (out/tp, in), b (out/tp)     x (.., in) replicated -> y (.., out/tp) sharded
    RowParallelLinear     W (out, in/tp), b (out) repl.  x (.., in/tp) sharded -> y (.., out) replicated
    VocabParallelEmbedding  W (V/tp, D)                  ids replicated -> (.., D) replicated
    VocabParallelLinearCrossEntropy  h (N, D) replicated, W (V/tp, D) -> loss, chunked, never gathering V

Every layer is built from the unsharded nn.Module by slicing this rank's part of its weights,
so the same initial weights give the same function. Sharded parameters carry
`tensor_model_parallel=True` (+ `partition_dim`), which DeepSpeed's gradient-norm code reads
(deepspeed.runtime.utils.is_model_parallel_parameter): they are counted on every TP rank,
unmarked (replicated) ones only on TP rank 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.loss import linear_cross_entropy


def mark_tp_param(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    return p


def _shard(t: torch.Tensor, dim: int, rank: int, world: int, what: str) -> torch.Tensor:
    n = t.shape[dim]
    if n % world:
        raise ValueError(f"{what}: size {n} along dim {dim} does not split over {world} tensor-parallel ranks")
    k = n // world
    return t.detach().narrow(dim, rank * k, k).clone()


# ----------------------------------------------------------------------------- collectives

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)  # never reduce a gradient buffer shared elsewhere
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.is_contiguous():
            ctx.mark_dirty(x)                                       # reduced in place
        else:
            x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce of a fresh partial sum (the caller's own matmul/lookup output, reduced in place)."""
    return _ReduceFromTP.apply(x, group)


# ----------------------------------------------------------------------------- layers

class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's slice of the output features (x replicated, y sharded).

    copy_input=False when the caller has already put x through copy_to_tp (attention copies its
    input once for q, k and v together).
    """

    def __init__(self, linear: nn.Linear, group, copy_input: bool = True):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.copy_input = group, copy_input
        self.in_features = linear.in_features
        self.out_features = linear.out_features // world           # local width (attention reads it)
        self.full_out_features = linear.out_features
        rg = linear.weight.requires_grad
        self.weight = mark_tp_param(nn.Parameter(_shard(linear.weight, 0, rank, world, "column weight"), rg), 0)
        self.bias = None
        if linear.bias is not None:
            self.bias = mark_tp_param(nn.Parameter(_shard(linear.bias, 0, rank, world, "column bias"), rg), 0)

    def forward(self, x):
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)                 # (.., out/tp)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}/{self.full_out_features}, copy_input={self.copy_input}"


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: input features sharded, output all-reduced, bias added once after."""

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.in_features = linear.in_features // world
        self.full_in_features = linear.in_features
        self.out_features = linear.out_features
        rg = linear.weight.requires_grad
        self.weight = mark_tp_param(nn.Parameter(_shard(linear.weight, 1, rank, world, "row weight"), rg), 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), rg)  # replicated

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.group)   # (.., out) full sum
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in={self.in_features}/{self.full_in_features}, out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V/tp) of the table; other ids give zeros, then all-reduce."""

    def __init__(self, emb: nn.Embedding, group):
        super().__init__()
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
            raise ValueError("VocabParallelEmbedding supports plain embeddings only "
                             "(no padding_idx, max_norm or sparse gradients)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.num_embeddings_full = emb.num_embeddings
        self.num_embeddings = emb.num_embeddings // world
        self.embedding_dim = emb.embedding_dim
        self.vocab_start = rank * self.num_embeddings
        self.weight = mark_tp_param(
            nn.Parameter(_shard(emb.weight, 0, rank, world, "embedding"), emb.weight.requires_grad), 0)

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)   # (.., D)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self):
        hi = self.vocab_start + self.num_embeddings
        return f"rows [{self.vocab_start}, {hi}) of {self.num_embeddings_full}, dim={self.embedding_dim}"


# ----------------------------------------------------------------------------- loss

class VocabParallelLinearCrossEntropy(nn.Module):
    """Drop-in for model.loss.LinearCrossEntropy under TP: (h (B, T, D), weight (V/tp, D), bias (V/tp,),
    labels (B, T)) -> (sum, count), chunked over tokens, never holding full-vocabulary logits.

    h must already be in the TP region (copy_to_tp: its gradient, a partial sum over this rank's
    vocabulary rows, is all-reduced there). Two all-reduces of (N,)-sized tensors per forward
    (max, then sum-of-exponentials / target logit / smoothing sum stacked), none in backward.
    """

    def __init__(self, group, vocab_start: int, vocab_total: int, ignore_index: int = -100,
                 label_smoothing: float = 0.0, smooth_classes: int | None = None, chunk: int = 0):
        super().__init__()
        self.group, self.vocab_start, self.vocab_total = group, vocab_start, vocab_total
        self.ignore_index, self.label_smoothing, self.smooth_classes = ignore_index, label_smoothing, smooth_classes
        self.chunk = chunk

    def _max(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def _sum(self, t):
        dist.all_reduce(t, group=self.group)
        return t

    def forward(self, h, weight, bias, labels):
        loss = linear_cross_entropy(h, weight, bias, labels, chunk=self.chunk, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing,
                                    smooth_classes=self.smooth_classes or self.vocab_total,
                                    vocab_start=self.vocab_start, reduce_max=self._max, reduce_sum=self._sum)
        return loss, (labels != self.ignore_index).sum()


# ----------------------------------------------------------------------------- plan helpers

def shard_attention(m: nn.Module, group) -> None:
    """An attention module's q, k, v -> ColumnParallelLinear (this rank's heads; its input is
    copied into the TP region once, by the plan's hook), o -> RowParallelLinear."""
    for c in ("q", "k", "v"):
        setattr(m, c, ColumnParallelLinear(getattr(m, c), group, copy_input=False))
    m.o = RowParallelLinear(m.o, group)


def copy_output_hook(group):
    """A forward hook copying a module's (replicated) output into the TP region."""
    def hook(module, args, output):
        return copy_to_tp(output, group)
    return hook


def vocab_parallel_criterion(crit: nn.Module, emb: VocabParallelEmbedding, group) -> "VocabParallelLinearCrossEntropy":
    """The model's LinearCrossEntropy, as its vocabulary-parallel counterpart over emb's rows."""
    return VocabParallelLinearCrossEntropy(group, emb.vocab_start, emb.num_embeddings_full,
                                           ignore_index=crit.ignore_index, label_smoothing=crit.label_smoothing,
                                           smooth_classes=getattr(crit, "n_classes", 0) or None,
                                           chunk=getattr(crit, "chunk", 0))


# ----------------------------------------------------------------------------- gradients

def clip_grad_norm_tp(parameters, max_norm: float, group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of a tensor-parallel model, clipped to max_norm in place
    (max_norm = inf: the norm only). Sharded gradients (tensor_model_parallel) are summed over
    the TP group, replicated ones counted once; both through torch's foreach kernels (one launch
    per group of tensors, not one norm per parameter). -> the norm, a 0-dim tensor on the
    gradients' device. The gradients must be final (data-parallel reduced) and the same on
    every TP rank for replicated parameters, as the TP layers keep them."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    sharded = [p.grad for p in params if getattr(p, "tensor_model_parallel", False)]
    replicated = [p.grad for p in params if not getattr(p, "tensor_model_parallel", False)]
    sq = torch.zeros((), dtype=torch.float32, device=params[0].grad.device)
    if sharded:
        part = torch.nn.utils.get_total_norm(sharded, 2.0).float() ** 2
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(part, group=group)
        sq = sq + part
    if replicated:
        sq = sq + torch.nn.utils.get_total_norm(replicated, 2.0).float() ** 2
    total = sq.sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
