"""`encdec plan`: the config's layout on N nodes x G GPUs, and the layouts that fit, ranked.

Layouts searched: tp in {1, 2, 4, 8} (inside a node, dividing heads and d_ff), ZeRO 0-3,
micro-batch in powers of two dividing global_batch / dp, activation checkpointing off/on.
Ranked by estimated step time (fastest first), then by memory per rank.
"""
from __future__ import annotations

import dataclasses
import json

from launcher.config import ConfigError, RunConfig, load_config
from launcher.parallel.dims import check_supported, effective_zero_stage
from launcher.planner.calibrate import calibrate as measure_compute
from launcher.planner.model import GIB, Hardware, Layout, estimate, param_counts
from launcher.training.inputs import model_config

DEFAULT_VOCAB = 32000


def _model_for(cfg: RunConfig, tp: int, vocab: int):
    c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp))
    real = cfg.model.real_vocab_size or cfg.model.vocab_size or vocab
    return model_config(c, real)


def _cfg_for(cfg: RunConfig, tp: int, vocab: int) -> RunConfig:
    return dataclasses.replace(cfg, model=_model_for(cfg, tp, vocab))


def candidate_layouts(cfg: RunConfig, world: int, gpus_per_node: int):
    m, gb = cfg.model, cfg.train.global_batch_size
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or world % tp or m.n_heads % tp or m.d_ff % tp:
            continue
        dp = world // tp
        for zero in ((0, 1, 2, 3) if dp > 1 or cfg.parallel.zero_at_one_rank else (0,)):   # dp 1 runs ZeRO 0
            try:
                check_supported(tp, zero)
            except ConfigError:
                continue
            micro = 1
            while micro <= gb:
                if gb % (micro * dp) == 0:
                    for ckpt in (False, True):
                        yield Layout(tp, dp, zero, micro, ckpt)
                micro *= 2


def plan(cfg: RunConfig, nodes: int, gpus_per_node: int, hw: Hardware, vocab: int = DEFAULT_VOCAB,
         top: int = 10, calibration: dict | None = None) -> dict:
    """The config's layout and the fitting layouts, ranked. With a calibration (planner/calibrate.py,
    at the config's micro-batch) the config's compute time is the measured one and every other
    layout's heuristic compute time is scaled by the same measured / heuristic ratio."""
    world = nodes * gpus_per_node
    p = cfg.parallel
    if world % p.tp:
        raise ConfigError(f"config key 'parallel.tp': {world} GPUs are not a multiple of tp={p.tp}")
    dp = world // p.tp
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.train.global_batch_size} does not divide "
                          f"into micro_batch_size={cfg.train.micro_batch_size} x dp={dp} on {world} GPUs")
    own = Layout(p.tp, dp, effective_zero_stage(p.zero_stage, dp, p.zero_at_one_rank), cfg.train.micro_batch_size,
                 p.activation_checkpointing)
    cur = estimate(_cfg_for(cfg, p.tp, vocab), own, hw, calibration=calibration)
    scale = cur["compute_time_s"] / cur["heuristic_compute_time_s"] if calibration else 1.0
    fitting = []
    for lay in candidate_layouts(cfg, world, gpus_per_node):
        e = estimate(_cfg_for(cfg, lay.tp, vocab), lay, hw, compute_scale=scale)
        if e["fits"]:
            fitting.append(e)
    fitting.sort(key=lambda e: (round(e["step_time_s"], 6), e["per_rank_bytes"]["total"]))
    n_params = param_counts(_model_for(cfg, 1, vocab), 1)["total"]
    return {"params": n_params, "world": world, "nodes": nodes, "gpus_per_node": gpus_per_node,
            "gpu_memory_bytes": hw.gpu_memory_bytes, "peak_flops_per_gpu": hw.peak_flops,
            "layout": cur["layout"], "accum": cur["accum"], "per_rank_bytes": cur["per_rank_bytes"],
            "comm_bytes_per_step": cur["comm_bytes_per_step"], "flops_per_step": cur["flops_per_step"],
            "step_time_s": cur["step_time_s"], "mfu": cur["mfu"], "fits": cur["fits"],
            "layouts": [{**e["layout"], "accum": e["accum"], "per_rank_gib": e["per_rank_bytes"]["total"] / GIB,
                         "step_time_s": e["step_time_s"], "mfu": e["mfu"]} for e in fitting[:top]],
            "n_fitting": len(fitting), "calibration": calibration}


def _lay(d: dict) -> str:
    return (f"tp {d['tp']} x dp {d['dp']}, ZeRO {d['zero']}, micro-batch {d['micro']}, "
            f"checkpointing {'on' if d['ckpt'] else 'off'}")


def format_plan(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    pr, comm = r["per_rank_bytes"], r["comm_bytes_per_step"]
    lines = [f"model: {r['params'] / 1e9:.3f}B parameters; {r['nodes']} node(s) x {r['gpus_per_node']} GPUs "
             f"of {r['gpu_memory_bytes'] / GIB:.0f} GiB, peak {r['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s each",
             f"config layout: {_lay(r['layout'])}, accumulation {r['accum']}",
             "per rank:"]
    for k in ("params", "grads", "optimizer", "activations", "loss", "total"):
        lines.append(f"  {k:12s}{g(pr[k])}")
    lines += [f"communication per step: TP all-reduce {comm['tp_all_reduce'] / GIB:.2f} GiB, "
              f"DP all-reduce {comm['dp']['all_reduce'] / GIB:.2f} GiB, reduce-scatter "
              f"{comm['dp']['reduce_scatter'] / GIB:.2f} GiB, all-gather {comm['dp']['all_gather'] / GIB:.2f} GiB",
              f"FLOPs per step {r['flops_per_step']:.3e}; estimated step {r['step_time_s']:.2f} s, "
              f"MFU {100 * r['mfu']:.0f}%; fits: {'yes' if r['fits'] else 'NO'}",
              f"layouts that fit ({r['n_fitting']}), fastest first:"]
    if r.get("calibration"):
        c = r["calibration"]
        lines.insert(-1, f"compute calibrated on {c['device']} ({c['precision']}, micro-batch {c['micro']}): "
                         f"encoder layer {1e3 * c['encoder_layer_s']:.2f} ms, decoder layer "
                         f"{1e3 * c['decoder_layer_s']:.2f} ms, rest {1e3 * c['rest_s']:.2f} ms per micro-batch")
    for i, d in enumerate(r["layouts"], 1):
        lines.append(f"  {i:2d}. {_lay(d)}, accum {d['accum']}: {d['per_rank_gib']:.1f} GiB/rank, "
                     f"step {d['step_time_s']:.2f} s, MFU {100 * d['mfu']:.0f}%")
    return "\n".join(lines)


def main(config: str, overrides: list, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
         peak_tflops: float | None, as_json: bool, vocab: int = DEFAULT_VOCAB, calibrate: bool = False,
         device: str | None = None) -> int:
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if gpu_memory_gib <= 0 or (peak_tflops is not None and peak_tflops <= 0):
        raise ConfigError("--gpu-memory-gib and --peak-tflops must be > 0")
    cfg = load_config(config, overrides)
    hw = Hardware(gpu_memory_bytes=gpu_memory_gib * GIB, gpus_per_node=gpus_per_node)
    if peak_tflops:
        hw.peak_flops = peak_tflops * 1e12
    cal = measure_compute(_cfg_for(cfg, 1, vocab), cfg.train.micro_batch_size, device) if calibrate else None
    r = plan(cfg, nodes, gpus_per_node, hw, vocab, calibration=cal)
    print(json.dumps(r, indent=2) if as_json else format_plan(r))
    return 0
