"""Memory, communication and time model of one training layout (what `encdec plan` prints).

Per rank, for a layout (tp, dp, ZeRO stage, micro-batch B, activation checkpointing), with
P_l = this rank's parameters after the TP split (sharded tensors / tp, replicated ones whole)
and N = dp. The engine is DeepSpeed in fp32 (master weights and gradients, bf16 from autocast,
launcher/precision.py), as the trainer runs it; bytes per parameter, held across steps / only
while a step computes its gradients (measured with live tensor bytes, tests/test_planner.py):

              params        optimizer (ZeRO: fp32 copy, Adam m, v)   grads held  grads during a step
    ZeRO 0    4 P_l         8 P_l                                    -           4 P_l
    ZeRO 1, 2 4 P_l         (4 + 8) P_l / N                          bucket      4 P_l + 4 P_l / N
    ZeRO 3    4 P_l / N     (4 + 8) P_l / N                          4 P_l / N   4 P_l + gathered
                                                                     + bucket
              (+ persistent small parameters whole)
    and at N = 1 (ZeRO 1-3) 4 P_l more during the step: DeepSpeed's flat copy of a whole-model
    gradient partition next to the reduced one.

bucket: the reduce buffer, min(comm.reduce_bucket_size, P_l) elements; gathered: ZeRO-3's
working set, max(largest layer, prefetch bucket) capped by the partitioned parameters. The
gradients of a step appear in backward while the activations are freed, so the peak is the
held states plus the larger of the two (peak_bytes), not their sum. `mixed=True` gives
DeepSpeed's own bf16/fp16 accounting instead (2-byte weights and gradients + fp32 master,
gradient and moments), the one its estimators use.

Activations saved for backward per micro-batch: each architecture's own terms (the
activation_terms of its model file, e.g. model/transformer.py, model/t5.py), one encoder layer,
one decoder layer and the rest; with activation checkpointing only each layer's input is kept,
plus one layer recomputed.

The loss (model/loss.py) holds per token a few floats and, per chunk of tokens, (chunk, V/tp)
fp32 logits (kept for backward when one chunk holds every token) plus the fp32 gradient of the
output projection (V/tp, D) being accumulated in backward.

Communication per optimizer step, bytes each rank passes to collectives (all-reduce: the tensor;
all-gather: the gathered output; reduce-scatter: the input), as bench/measure.py counts:
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

from launcher.monitor import flops
from launcher.planner.calibrate import compute_time
from launcher.precision import precision_of
from launcher.parallel.plan import shard_dims
from model import arch_of, build, make_config
from model.loss import chunk_tokens

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
    c = make_config(**dict(key))
    m = build(c, "meta")
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
    """Per-rank bytes of parameters, gradients (at their peak) and optimizer state, and "transient":
    the part of the gradients that exists only while a step computes them (see the module docstring)."""
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
        return {"params": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "transient": 4 * P}
    one_rank = 4 * P if N == 1 else 0
    if z in (1, 2):
        t = 4 * P + 4 * P / N + one_rank
        return {"params": 4 * P, "grads": 4 * bucket + t, "optimizer": 12 * P / N, "transient": t}
    part = P - pc["persistent"]
    # gathered weights: DeepSpeed prefetches up to the prefetch bucket ahead and keeps weights it will reuse soon
    prefetch = min(getattr(comm, "stage3_prefetch_bucket_size", 50_000_000), P)
    gathered = 4 * min(max(pc["largest_layer_local"], prefetch), part)
    transient = 4 * P + gathered + one_rank
    return {"params": 4 * (part / N + pc["persistent"]), "grads": 4 * P / N + 4 * bucket + transient,
            "optimizer": 12 * P / N, "transient": transient}


def peak_bytes(states: dict, activations: float) -> float:
    """A rank's peak: what it holds across steps, plus the larger of the micro-batch's activations
    (with the loss buffer) and the step's transient gradients (backward frees one as the other grows)."""
    held = states["params"] + states["optimizer"] + states["grads"] - states["transient"]
    return held + max(activations, states["transient"])


def activations(c, lay: Layout, S: int, T: int, bf16: bool) -> dict:
    """Activation bytes saved for backward per rank (one micro-batch), and one layer's worth."""
    enc_layer, dec_layer, fixed = arch_of(c).activation_terms(c, lay.micro, S, T, lay.tp, bf16)
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
    ch = min(chunk_tokens(V, chunk, gpu=True), n)                # the planner plans GPU runs
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


def estimate(cfg, lay: Layout, hw: Hardware, vocab: int | None = None, calibration: dict | None = None,
             compute_scale: float = 1.0) -> dict:
    """Everything `encdec plan` reports for one layout. calibration (planner/calibrate.py, measured at
    this layout's micro-batch): the compute time from it; compute_scale: a factor on the heuristic
    compute time (the calibrated / heuristic ratio of another layout)."""
    c = cfg.model
    S, T = cfg.data.max_src_len, cfg.data.max_tgt_len
    bf16 = precision_of(cfg).mixed                 # matmul operands in bf16 (launcher/precision.py)
    global_batch = cfg.train.global_batch_size
    accum = max(1, global_batch // (lay.micro * lay.dp))
    states = model_states(c, lay, cfg.comm)
    act = activations(c, lay, S, T, bf16)
    lossb = loss_buffer(c, lay, T, bf16)
    per_rank = {k: states[k] for k in ("params", "grads", "optimizer")}
    per_rank.update(activations=act["activations"], loss=lossb,
                    total=peak_bytes(states, act["activations"] + lossb))
    comm = comm_bytes(c, lay, S, T, bf16, accum)
    step_flops = flops.train_flops(c, global_batch, S, T)
    hw_flops = flops.train_flops(c, global_batch, S, T, recompute=lay.ckpt)
    world = lay.tp * lay.dp
    # matmul efficiency grows with the work of one micro-batch on one rank (tokens x local width):
    # half of hw.efficiency at 2^20 token-columns, saturating above (a heuristic, not measured here)
    x = lay.micro * (S + T) * c.d_model / lay.tp / 2 ** 20
    t_heuristic = hw_flops / world / (hw.peak_flops * hw.efficiency * x / (x + 1))
    if lay.zero == 3:
        t_heuristic *= 1.05             # parameter-fetch hooks and latency not hidden (heuristic)
    if calibration is not None:
        P = param_counts(c, lay.tp)["local"]
        t_compute = compute_time(calibration, c, lay.tp, accum, lay.ckpt, P / (lay.dp if lay.zero else 1))
    else:
        t_compute = t_heuristic * compute_scale
    # TP inside a node (NVLink); data-parallel traffic crosses nodes when dp spans them
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
            "compute_time_s": t_compute, "heuristic_compute_time_s": t_heuristic,
            "mfu": step_flops / step / (hw.peak_flops * world),
            "fits": per_rank["total"] + hw.reserve_bytes <= hw.gpu_memory_bytes}
