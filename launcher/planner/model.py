"""Memory, communication and time model of one training layout (what `encdec plan` prints).

Per rank, for a layout (tp, dp, ZeRO stage, micro-batch B, activation checkpointing), with
P_l = this rank's parameters after the TP split (sharded tensors / tp, replicated ones whole)
and N = dp. The engine is DeepSpeed in fp32 (master weights and gradients, bf16 from autocast),
as the trainer runs it; bytes per parameter:

              params        grads                          optimizer (Adam m, v; ZeRO's fp32 copy + its grad)
    ZeRO 0    4 P_l         4 P_l                          8 P_l
    ZeRO 1    4 P_l         4 P_l / N + bucket             (4 + 4 + 8) P_l / N      (4 P_l grads without overlap_comm)
    ZeRO 2    4 P_l         4 P_l / N + bucket             (4 + 4 + 8) P_l / N
    ZeRO 3    4 P_l / N     4 P_l / N + bucket             (4 + 4 + 8) P_l / N      (+ persistent small
              + gathered                                                            parameters whole)

bucket: the reduce buffer, min(comm.reduce_bucket_size, P_l) elements; gathered: ZeRO-3's
working set, max(largest layer, prefetch bucket) capped by the partitioned parameters. `mixed=True` gives DeepSpeed's own bf16/fp16 accounting instead (2-byte weights
and gradients + fp32 master, gradient and moments), the one its estimators use.

Activations saved for backward per micro-batch (tokens: B S source, B T target; D, F, H; a =
bytes of matmul operands (4 fp32, 2 bf16 autocast); r = 4, the fp32 residual stream and
LayerNorm inputs; flash/efficient SDPA, so no S x S matrix; dropout masks 1 byte):

    encoder layer, per token   2 r D (LN inputs) + 2 a D (LN outputs into linears)
                               + a (3 D + D + D) / tp (q|k|v, attention output, its copy) + a F / tp
                               + 2 D (dropout masks) + 4 H / tp (log-sum-exp)
    decoder layer, per token   3 r D + 3 a D + a (3 D + 3 D + D) / tp + a F / tp + 3 D + 8 H / tp
                  per source   2 a D / tp (cross-attention k|v)
    + fused-projection weight copies per layer (q|k|v and k|v concatenations, saved in fp32 runs;
      bf16 casts of every weight under autocast), embeddings' dropout masks, final norms.
With activation checkpointing only each layer's input is kept, plus one layer recomputed.

The loss (model/loss.py) holds per token a few floats and, per chunk of tokens, (chunk, V/tp)
fp32 logits (kept for backward when one chunk holds every token) plus the fp32 gradient of the
output projection (V/tp, D) being accumulated in backward.

Communication per optimizer step, bytes each rank passes to collectives (all-reduce: the tensor;
all-gather: the gathered output; reduce-scatter: the input), as launcher/planner/measure counts:
    TP (per micro-batch)  forward: embeddings B (S+T) D x 4 + 2 per encoder layer (B S D a) +
                          3 per decoder layer (B T D a) + loss 16 B T; backward: the same count of
                          (B S D / B T D) x 4 for every copied input (2 per encoder layer, 3 per
                          decoder layer, encoder and decoder outputs); checkpointing repeats the
                          layers' forward all-reduces
    ZeRO 0                all-reduce of the gradients: 4 P_l
    ZeRO 1, 2             gradient all-reduce 4 P_l + parameter all-gather 4 P_l
    ZeRO 3                reduce-scatter 4 P_l + all-gather of the partitioned parameters per
                          forward (DeepSpeed keeps them for the backward: stage3_max_reuse_distance)
                          + of the persistent ones after the step
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from launcher.monitor import flops
from launcher.parallel.plan import shard_dims
from model import build
from model.loss import chunk_tokens
from model.transformer import ModelConfig

GIB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    zero: int
    micro: int
    ckpt: bool


@dataclass
class Hardware:
    gpu_memory_bytes: float = 80 * GIB
    peak_flops: float = 989e12          # bf16 dense per GPU (H100/H200 SXM)
    intra_node_bw: float = 450e9        # bytes/s per GPU, NVLink (algorithm bandwidth of all-reduce)
    inter_node_bw: float = 50e9         # bytes/s per GPU, e.g. 400 Gb/s InfiniBand per GPU
    gpus_per_node: int = 8
    efficiency: float = 0.6             # achievable fraction of peak for large matmuls
    reserve_bytes: float = 4 * GIB      # CUDA context, allocator fragmentation, NCCL buffers


def param_counts(c, tp: int, persistence_threshold: int = 100_000) -> dict:
    """Parameter counts from the model itself (built on the meta device, the TP plan's shard map)."""
    return _param_counts(tuple(sorted(dataclasses.asdict(c).items())), tp, persistence_threshold)


@functools.lru_cache(maxsize=64)
def _param_counts(key, tp: int, persistence_threshold: int) -> dict:
    c = ModelConfig(**dict(key))
    with torch.device("meta"):
        m = build(c)                                   # model.arch: transformer or t5
    dims = shard_dims(m)
    total = local = persistent = 0
    for k, p in m.named_parameters():
        n = p.numel()
        loc = n // tp if k in dims else n
        total += n
        local += loc
        if loc < persistence_threshold:
            persistent += loc
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in (*m.encoder, *m.decoder))
    module = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    return {"total": total, "local": local, "persistent": persistent, "largest_layer_local": layer // tp,
            "largest_module_local": module // tp, "embedding": c.vocab_size * c.d_model}


def model_states(c, lay: Layout, comm=None, mixed: bool = False) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state (see the module docstring)."""
    thr = getattr(comm, "stage3_param_persistence_threshold", 100_000)
    pc = param_counts(c, lay.tp, thr)
    P, N, z = pc["local"], lay.dp, lay.zero
    if mixed:
        # DeepSpeed's own accounting (its estimators): 2-byte weights and gradients, and per
        # partitioned parameter 16 bytes of fp32 master weight, fp32 gradient, Adam m and v
        L = pc["largest_module_local"]
        if z == 0:
            return {"params": 2 * P, "grads": 2 * P, "optimizer": 16 * P}
        if z == 1:
            return {"params": 2 * P, "grads": 2 * P, "optimizer": 16 * P / N}
        if z == 2:
            return {"params": 2 * P, "grads": 2 * P / N, "optimizer": 16 * P / N}
        return {"params": 2 * P / N + 2 * L, "grads": 2 * L, "optimizer": 16 * P / N}
    bucket = min(getattr(comm, "reduce_bucket_size", 200_000_000), P)   # one bucket live at a time (measured)
    if z == 0:
        return {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P}
    if z == 1 and not getattr(comm, "overlap_comm", True):    # full gradients until the boundary
        return {"params": 4 * P, "grads": 4 * P + 4 * bucket, "optimizer": 16 * P / N}
    if z in (1, 2):      # with overlap_comm DeepSpeed reduces ZeRO-1 gradients in backward too (measured)
        return {"params": 4 * P, "grads": 4 * P / N + 4 * bucket, "optimizer": 16 * P / N}
    part = P - pc["persistent"]
    # gathered weights: DeepSpeed prefetches up to the prefetch bucket ahead and keeps weights it will reuse soon
    prefetch = min(getattr(comm, "stage3_prefetch_bucket_size", 50_000_000), P)
    gathered = 4 * min(max(pc["largest_layer_local"], prefetch), part)
    return {"params": 4 * (part / N + pc["persistent"]) + gathered, "grads": 4 * P / N + 4 * bucket,
            "optimizer": 16 * P / N}


def _attn_weights(c, tp, bf16):
    """Weight copies saved per (encoder, decoder) layer: fused concatenations (fp32) or all bf16 casts."""
    D, F = c.d_model, c.d_ff
    if bf16:   # autocast keeps a bf16 copy of every weight it casts (and of the concatenations)
        return 2 * (5 * D * D + 2 * D * F) / tp, 2 * (3 * D * D + D * D + D * D + 2 * D * D + D * D + 2 * D * F) / tp
    return 4 * 3 * D * D / tp, 4 * (3 + 2) * D * D / tp


def _t5_layers(c, lay: Layout, S: int, T: int, bf16: bool) -> tuple[float, float, float]:
    """model.arch=t5: (encoder layer, decoder layer, per-stack fixed) activation bytes. As the
    seed model's, with: RMS norms (input, normalised x, output), inner width I = H Dk, the gated
    FFN (wi_0, gelu, wi_1, product and its dropout mask: 4 F), attention dropout at model.dropout
    (the math kernel keeps scores, probabilities, mask and dropped probabilities), and the position bias of
    each stack (1, H, L, L) fp32 with its masked copy, shared by the stack's layers."""
    D, F, H, tp, B = c.d_model, c.d_ff, c.n_heads, lay.tp, lay.micro
    inner = H * (c.head_dim or D // H)
    a, r = (2 if bf16 else 4), 4
    drop = 1 if c.dropout > 0 else 0
    norm = 2 * r * D + a * D
    ffn = (4 * a * F + drop * F) / tp
    enc_tok = 2 * norm + a * 4 * inner / tp + ffn + 2 * drop * D + 4 * H / tp
    dec_tok = 3 * norm + a * 6 * inner / tp + ffn + 3 * drop * D + 8 * H / tp
    dec_src = 2 * a * inner / tp
    enc_layer = B * S * enc_tok
    dec_layer = B * T * dec_tok + B * S * dec_src
    if drop:
        enc_layer += B * H / tp * S * S * (3 * a + 1)
        dec_layer += B * H / tp * (T * T + T * S) * (3 * a + 1)
    bias = 2 * 4 * H / tp * (S * S + T * T)
    fixed = bias + 2 * drop * B * (S + T) * D + (norm + drop * D) * B * (S + T)   # masks, final norms
    return enc_layer, dec_layer, fixed


def activations(c, lay: Layout, S: int, T: int, bf16: bool) -> dict:
    """Activation bytes saved for backward per rank (one micro-batch), and one layer's worth."""
    if c.arch == "t5":
        enc_layer, dec_layer, fixed = _t5_layers(c, lay, S, T, bf16)
        return _stacks(c, lay, S, T, enc_layer, dec_layer, fixed)
    D, F, H, tp, B = c.d_model, c.d_ff, c.n_heads, lay.tp, lay.micro
    a, r = (2 if bf16 else 4), 4
    drop = 1 if c.dropout > 0 else 0
    enc_tok = 2 * r * D + 2 * a * D + a * 5 * D / tp + a * F / tp + 2 * drop * D + 4 * H / tp + 8
    dec_tok = 3 * r * D + 3 * a * D + a * 7 * D / tp + a * F / tp + 3 * drop * D + 8 * H / tp + 12
    dec_src = 2 * a * D / tp + (a * D if bf16 else 0)          # k|v of the memory (+ its bf16 cast per layer)
    w_enc, w_dec = _attn_weights(c, tp, bf16)
    enc_layer = B * S * enc_tok + w_enc
    dec_layer = B * T * dec_tok + B * S * dec_src + w_dec
    if c.attention_dropout > 0:                                # math attention: probabilities + mask kept
        enc_layer += B * H / tp * S * S * (a + 1)
        dec_layer += B * H / tp * (T * T + T * S) * (a + 1)
    fixed = drop * B * (S + T) * D + 2 * r * B * S * D + r * B * T * D      # embedding masks, final norms
    return _stacks(c, lay, S, T, enc_layer, dec_layer, fixed)


def _stacks(c, lay: Layout, S: int, T: int, enc_layer: float, dec_layer: float, fixed: float) -> dict:
    """Both stacks from one layer's bytes: every layer kept, or (activation checkpointing) each
    layer's input kept and one layer recomputed at a time."""
    B, D, r = lay.micro, c.d_model, 4
    Le, Ld = c.n_encoder_layers, c.n_decoder_layers
    if lay.ckpt:
        stored = Le * r * B * S * D + Ld * r * B * T * D + fixed
        act = stored + max(enc_layer, dec_layer)
    else:
        act = Le * enc_layer + Ld * dec_layer + fixed
    return {"activations": act, "enc_layer": enc_layer, "dec_layer": dec_layer}


def loss_buffer(c, lay: Layout, T: int, bf16: bool, chunk: int = 0) -> float:
    V = c.vocab_size // lay.tp
    n = lay.micro * T
    ch = min(chunk_tokens(V, chunk), n)
    per_tok = 4 * 6 + 8 + 1                                    # lse, statistics, labels, masks
    logits = 4 * ch * V * 2 + ((2 * ch * V) if bf16 else 0)    # a chunk's fp32 logits and its softmax/grad
    grad_w = 4 * V * c.d_model                                 # fp32 accumulator of the projection gradient
    return n * per_tok + logits + grad_w


def comm_bytes(c, lay: Layout, S: int, T: int, bf16: bool, accum: int = 1) -> dict:
    """Bytes per optimizer step each rank passes to collectives, by kind (see the module docstring)."""
    D, B, tp = c.d_model, lay.micro, lay.tp
    a = 2 if bf16 else 4
    Le, Ld = c.n_encoder_layers, c.n_decoder_layers
    tp_b = 0.0
    if tp > 1:
        fwd_layers = a * B * D * (2 * Le * S + 3 * Ld * T)
        fwd = 4 * B * (S + T) * D + fwd_layers + 16 * B * T
        bwd = 4 * B * D * (2 * Le * S + 3 * Ld * T + S + T)
        tp_b = (fwd + bwd + (fwd_layers if lay.ckpt else 0)) * accum
    pc = param_counts(c, tp)
    P = pc["local"]
    dp_b = {"all_reduce": 0.0, "reduce_scatter": 0.0, "all_gather": 0.0}
    if lay.dp > 1:
        if lay.zero == 0:
            dp_b["all_reduce"] = 4 * P
        elif lay.zero in (1, 2):
            dp_b["all_reduce"], dp_b["all_gather"] = 4 * P, 4 * P
        else:   # gathered for each forward, kept for its backward (reuse distance), persistent ones after the step
            part = P - pc["persistent"]
            dp_b["reduce_scatter"] = 4 * P
            dp_b["all_gather"] = 4 * part * accum + 4 * pc["persistent"]
    return {"tp_all_reduce": tp_b, "dp": dp_b, "total": tp_b + sum(dp_b.values())}


def estimate(cfg, lay: Layout, hw: Hardware, vocab: int | None = None) -> dict:
    """Everything `encdec plan` reports for one layout."""
    c = cfg.model
    S, T = cfg.data.max_src_len, cfg.data.max_tgt_len
    bf16 = cfg.train.precision == "bf16"
    global_batch = cfg.train.global_batch_size
    accum = max(1, global_batch // (lay.micro * lay.dp))
    states = model_states(c, lay, cfg.comm)
    act = activations(c, lay, S, T, bf16)
    lossb = loss_buffer(c, lay, T, bf16)
    per_rank = {**states, "activations": act["activations"], "loss": lossb}
    per_rank["total"] = sum(per_rank.values())
    comm = comm_bytes(c, lay, S, T, bf16, accum)
    step_flops = flops.train_flops(c, global_batch, S, T)
    hw_flops = flops.train_flops(c, global_batch, S, T, recompute=lay.ckpt)
    world = lay.tp * lay.dp
    # matmul efficiency grows with the work of one micro-batch on one rank (tokens x local width):
    # half of hw.efficiency at 2^20 token-columns, saturating above (a heuristic, not measured here)
    x = lay.micro * (S + T) * c.d_model / lay.tp / 2 ** 20
    t_compute = hw_flops / world / (hw.peak_flops * hw.efficiency * x / (x + 1))
    # TP inside a node (NVLink); data-parallel traffic crosses nodes when dp spans them
    if lay.zero == 3:
        t_compute *= 1.05               # parameter-fetch hooks and latency not hidden (heuristic)
    # ring algorithms: an all-reduce moves 2 (n-1)/n of the tensor per rank, all-gather and
    # reduce-scatter (n-1)/n of the whole
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    t_tp = 2 * ring(lay.tp) * comm["tp_all_reduce"] / hw.intra_node_bw
    dp_bw = hw.inter_node_bw if world > hw.gpus_per_node else hw.intra_node_bw
    d = comm["dp"]
    t_dp = ring(lay.dp) * (2 * d["all_reduce"] + d["reduce_scatter"] + d["all_gather"]) / dp_bw
    overlap = 0.5 if cfg.comm.overlap_comm and lay.zero > 0 else 0.0      # part of the DP traffic hidden
    step = t_compute + t_tp + t_dp * (1 - overlap)
    return {"layout": dataclasses.asdict(lay), "accum": accum, "per_rank_bytes": per_rank,
            "comm_bytes_per_step": comm, "flops_per_step": step_flops, "step_time_s": step,
            "mfu": step_flops / step / (hw.peak_flops * world),
            "fits": per_rank["total"] + hw.reserve_bytes <= hw.gpu_memory_bytes}
