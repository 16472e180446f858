"""Cross-entropy straight from the decoder's hidden states, chunked over tokens.

    loss = sum over tokens t with labels[t] != ignore_index of CE(h[t] W^T + bias, labels[t])

The plain path materialises logits (N, V) in fp32 for every target token at once (N = batch x
target length; 64 x 128 tokens x 32k vocabulary = 1 GiB, plus the softmax and its gradient).
Here the logits of `chunk` tokens at a time are computed, reduced to four numbers per token
(max, sum of exponentials, target logit, sum of logits for label smoothing) and dropped; the
backward recomputes each chunk's logits and turns them into gradients of h and W right away.
Peak extra memory: a few (chunk, V) fp32 buffers instead of several (N, V) ones, for one more
output matmul in backward (the forward matmul is recomputed: +1/3 of the output projection's
FLOPs, hardware work that model FLOPs and MFU leave out, as for activation checkpointing).
When every token fits in one chunk, its exponentials are kept for backward instead (no recompute).

The weight may hold only a slice of the vocabulary (rows [vocab_start, vocab_start + V_local)):
then `reduce_max` / `reduce_sum` callables combine the per-token numbers over the slices (the
tensor-parallel plan passes all-reduces over its group; launcher/parallel/tp.py). The model
itself never calls them with a full vocabulary. Two reductions per loss, whatever the chunk count.

Numerics: the same function as F.cross_entropy(F.linear(h, W) + bias) in fp32 (the logits
are computed in the autocast dtype when autocast is on, as the plain path does, then in fp32),
label smoothing over the first `smooth_classes` ids (the real vocabulary, padded ids excluded).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_BYTES = 64 * 2 ** 20      # fp32 logits per chunk on the CPU: 64 MiB (512 tokens of a 32k vocabulary)
GPU_CHUNK_BYTES = 2 * 2 ** 30   # on a GPU: 2 GiB (16k tokens of 32k): the chunk loop is memory-bound
                                # passes and kernel launches, which cost more time there than the memory saves


def chunk_tokens(n_vocab_local: int, chunk: int = 0, gpu: bool = False) -> int:
    """Tokens per chunk: `chunk` if > 0, else as many as fit CHUNK_BYTES (GPU_CHUNK_BYTES on a GPU)
    of fp32 logits."""
    budget = GPU_CHUNK_BYTES if gpu else CHUNK_BYTES
    return chunk if chunk > 0 else max(1, budget // (4 * max(n_vocab_local, 1)))


def _chunk_logits(hc, weight, bias):
    z = F.linear(hc, weight)                      # autocast dtype if autocast is on (as the plain path)
    zd = z.dtype
    z = z.float()
    if bias is not None:
        z = z + bias.float()
    return z, zd


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, opts):
        chunk, ignore_index, smoothing, k, vocab_start, reduce_max, reduce_sum = opts
        n, n_local = h.shape[0], weight.shape[0]
        valid = labels != ignore_index
        local = labels - vocab_start
        in_shard = valid & (local >= 0) & (local < n_local)
        idx = local.clamp(0, n_local - 1)
        k_local = min(max(k - vocab_start, 0), n_local)              # this slice's smoothed columns
        dev = h.device
        m = torch.empty(n, dtype=torch.float32, device=dev)
        stats = torch.zeros(3, n, dtype=torch.float32, device=dev)  # sum exp(z - m), target logit, sum z
        zdtype, kept = h.dtype, None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z, zdtype = _chunk_logits(h[s:e], weight, bias)
            mc = z.max(dim=-1).values
            m[s:e] = mc
            stats[1, s:e] = z.gather(-1, idx[s:e, None]).squeeze(-1) * in_shard[s:e]
            if smoothing > 0:
                stats[2, s:e] = z[:, :k_local].sum(dim=-1)
            z.sub_(mc[:, None]).exp_()
            stats[0, s:e] = z.sum(dim=-1)
            kept = z if e - s == n else None       # one chunk holds every token: keep, no recompute
            del z
        m_local = m
        if reduce_max is not None:                                  # vocabulary slices: combine
            m_all = reduce_max(m.clone())
            stats[0] *= torch.exp(m - m_all)
            stats = reduce_sum(stats)
            m = m_all
        lse = m + stats[0].log()                                    # log of the partition function
        loss = lse - stats[1]                                       # -log p(label)
        if smoothing > 0:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - stats[2] / k)
        loss = torch.where(valid, loss, torch.zeros_like(loss)).sum()
        ctx.kept = None if kept is None else (kept, m_local)       # exp(z - m) and m of the single chunk
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), idx, in_shard, valid, lse)
        ctx.has_bias = bias is not None
        ctx.chunk, ctx.smoothing, ctx.k, ctx.k_local, ctx.zdtype = chunk, smoothing, k, k_local, zdtype
        return loss

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, idx, in_shard, valid, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        n = h.shape[0]
        cd = ctx.zdtype                                             # the dtype the logits matmul ran in
        w_c = weight.to(cd)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        scale = g.float() * valid                                   # (N,) upstream gradient per token
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            hc = h[s:e]
            with torch.autocast(h.device.type, enabled=False):
                if ctx.kept is not None:                            # softmax from the kept chunk
                    ez, m = ctx.kept
                    ctx.kept = None
                    p = ez.mul_(torch.exp(m - lse)[:, None])
                else:                                               # recomputed, in place
                    z = F.linear(hc.to(cd), w_c).float()
                    if bias is not None:
                        z = z + bias.float()
                    p = z.sub_(lse[s:e, None]).exp_()
                rows = torch.arange(e - s, device=h.device)
                p[rows, idx[s:e]] -= (1.0 - ctx.smoothing) * in_shard[s:e].float()
                if ctx.smoothing > 0:
                    p[:, :ctx.k_local] -= ctx.smoothing / ctx.k
                p.mul_(scale[s:e, None])
                if need_b:
                    grad_b += p.sum(dim=0)
                pc = p.to(cd)
                del p
                if need_h:
                    grad_h[s:e] = (pc @ w_c).to(h.dtype)
                if need_w:
                    grad_w += (pc.t() @ hc.to(cd)).float()
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(h, weight, bias, labels, *, chunk: int = 0, ignore_index: int = -100,
                         label_smoothing: float = 0.0, smooth_classes: int = 0, vocab_start: int = 0,
                         reduce_max=None, reduce_sum=None) -> torch.Tensor:
    """Summed cross-entropy of h (.., D) against labels (..) through logits h W^T + bias.

    weight (V_local, D) holds vocabulary rows [vocab_start, vocab_start + V_local); with
    V_local < V, reduce_max / reduce_sum must combine (N,)-sized tensors over the slices (in
    place allowed, result returned). smooth_classes = K: label smoothing over ids < K (0 = V_local).
    """
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    k = smooth_classes or weight.shape[0]
    opts = (chunk_tokens(weight.shape[0], chunk, h.is_cuda), ignore_index, float(label_smoothing), k, vocab_start,
            reduce_max, reduce_sum)
    return _LinearCE.apply(h2, weight, bias, lab, opts)


class LinearCrossEntropy(nn.Module):
    """The model's criterion: (h (B, T, D), weight (V, D), bias (V,), labels (B, T)) -> (sum, count).

    n_classes > 0: smoothing spreads its mass over the real vocabulary only (padded ids have a
    -1e9 bias, so they never take probability mass). chunk: tokens per chunk (0 = CHUNK_BYTES).
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, n_classes: int = 0, chunk: int = 0):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.n_classes, self.chunk = ignore_index, label_smoothing, n_classes, chunk

    def forward(self, h, weight, bias, labels):
        loss = linear_cross_entropy(h, weight, bias, labels, chunk=self.chunk, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, smooth_classes=self.n_classes)
        return loss, (labels != self.ignore_index).sum()
