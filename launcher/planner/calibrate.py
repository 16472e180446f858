"""`encdec plan --calibrate`: the step-time model measured on this machine's device.

Without calibration the planner divides the step's FLOPs by a heuristic fraction of the device's
peak. With it, the compute time of one micro-batch is timed on the local device, with the
project's own model code (model/registry.py builds it), at the layout's micro-batch and lengths,
in train.precision and train mode, forward + backward:

    A = the model with 1 encoder + 1 decoder layer      B = 2 + 1 layers      C = 1 + 2 layers
    encoder layer = t(B) - t(A),  decoder layer = t(C) - t(A),  the rest (embeddings, final norms,
    the chunked loss) = t(A) - encoder layer - decoder layer

and a fused AdamW step over the rank's parameters (timed on at most 2^24 elements and scaled:
it streams memory). The step's compute is then accum x (rest + L_enc x encoder layer + L_dec x
decoder layer) (+ one forward per layer with activation checkpointing) + the optimizer step;
with tensor parallelism the layers' and the rest's time is divided by tp (each rank computes a
1/tp slice of every matmul; the calibration itself runs the whole layers, on one device), and
collectives keep the bandwidth model of planner/model.py. Each timing is the median of a few
repetitions after warm-up, with the device synchronized around it.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from launcher.precision import precision_of
from model import build


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_times(fns: list, device: str, warmup: int, reps: int) -> list[float]:
    """Median seconds of each function, timed in rotation (drift in the machine's load hits all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for r in range(reps):
        for i in [(r + k) % len(fns) for k in range(len(fns))]:
            _sync(device)
            t0 = time.perf_counter()
            fns[i]()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _model_step(cfg, micro: int, n_enc: int, n_dec: int, device: str):
    """forward + backward of the model with n_enc + n_dec layers on one random micro-batch."""
    c = dataclasses.replace(cfg.model, n_encoder_layers=n_enc, n_decoder_layers=n_dec)
    torch.manual_seed(0)
    model = build(c, device).train()
    S, T, V = cfg.data.max_src_len, cfg.data.max_tgt_len, c.real_vocab_size or c.vocab_size
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, V, (micro, S), generator=g).to(device)
    tgt = torch.randint(3, V, (micro, T + 1), generator=g).to(device)
    prec = precision_of(cfg)

    def step():
        with prec.autocast(device):
            loss, n = model(src, None, tgt[:, :-1], tgt[:, 1:])
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
    return step


def _adam_time(n_params: float, device: str, warmup: int, reps: int) -> float:
    n = int(min(n_params, 1 << 24))
    if n <= 0:
        return 0.0
    p = torch.zeros(n, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=device.startswith("cuda"))
    return _median_times([opt.step], device, warmup, reps)[0] * n_params / n


def calibrate(cfg, micro: int, device: str | None = None, warmup: int = 2, reps: int = 7) -> dict:
    """Measured seconds, on `device` (default: cuda if available, else cpu), of one micro-batch's
    forward + backward per encoder layer, per decoder layer and for the rest (the vocabulary
    sizes of cfg.model must be filled in), and of AdamW per parameter."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_a, t_b, t_c = _median_times([_model_step(cfg, micro, e, d, device) for e, d in ((1, 1), (2, 1), (1, 2))],
                                  device, warmup, reps)
    enc, dec = max(t_b - t_a, 0.0), max(t_c - t_a, 0.0)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "micro": micro, "precision": cfg.train.precision,
            "encoder_layer_s": enc, "decoder_layer_s": dec, "rest_s": max(t_a - enc - dec, 0.0),
            "adam_s_per_param": _adam_time(1 << 22, device, warmup, reps) / (1 << 22)}


def compute_time(cal: dict, c, tp: int, accum: int, ckpt: bool, optimizer_params: float) -> float:
    """A step's compute seconds on one rank from a calibration at the same micro-batch: layers and
    the rest per micro-batch (divided over tp), a forward per layer again under activation
    checkpointing (a third of forward + backward), and the optimizer over this rank's
    (ZeRO-partitioned) parameters."""
    layers = c.n_encoder_layers * cal["encoder_layer_s"] + c.n_decoder_layers * cal["decoder_layer_s"]
    if ckpt:
        layers *= 4 / 3
    return accum * (cal["rest_s"] + layers) / tp + optimizer_params * cal["adam_s_per_param"]
