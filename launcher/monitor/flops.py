"""Model FLOPs per training step of the encoder-decoder Transformer, device peaks, and MFU.

Notation: B samples, S source length, T target length (the padded lengths actually fed, i.e.
src_ids.shape[1] and tgt_ids.shape[1]), D d_model, F d_ff, V vocab_size (the padded embedding
rows, which is what the output matmul multiplies), Le / Ld encoder / decoder layers.
Only matrix multiplications are counted (one multiply-accumulate, MAC, = 2 FLOPs); norms,
softmax, activations, biases, embedding lookups and the loss are ignored, as is customary.

Forward MACs of one sample:

    encoder layer    S * (4 D^2 + 2 D F)        Q, K, V, O projections and the two FFN matmuls
                     + 2 S^2 D                  Q K^T (S x S per head, summed over heads) and A V
    decoder layer    T * (4 D^2 + 2 D F)        self-attention Q, K, V, O and the FFN
                     + 2 T^2 D                  causal self-attention Q K^T and A V, counted FULL T x T
                     + 2 T D^2 + 2 S D^2        cross-attention: Q, O on the target, K, V on the source
                     + 2 T S D                  cross-attention Q K^T (T x S) and A V
    output           T * D * V                  tied output projection (embedding^T)

    forward FLOPs  = 2 * MACs
    training FLOPs = 3 * forward FLOPs          backward = 2x forward (grads of inputs and weights)

The causal self-attention is counted as full T x T, as PaLM and most MFU reports do (and as
torch's FlopCounterMode does); kernels that skip the masked half therefore show a somewhat
lower MFU than the work they save would suggest, never a higher one.

"Model FLOPs" (PaLM's MFU definition) exclude activation-checkpointing recomputation: the
recomputed forward is hardware work, not model work. `train_flops(..., recompute=True)` returns
the hardware count (4x forward) for HFU if wanted; MFU must use recompute=False.

MFU = (model FLOPs per step / step time in s) / (peak FLOP/s per device * number of devices),
with the step FLOPs summed over every sample of the optimizer step (all micro-batches and all
data-parallel ranks) and the devices counted over the whole world (tp * dp).
"""
from __future__ import annotations

import os
from typing import Iterable

from common.errors import UserError
from model import arch_of

ENV_PEAK = "ENCDEC_PEAK_FLOPS"

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets. "tf32" is used for
# precision fp32 when torch is allowed to run fp32 matmuls on tensor cores
# (torch.get_float32_matmul_precision() != "highest"), "fp32" otherwise.
# Matched in order against the lower-cased device name; the first hit wins.
PEAK_TABLE: tuple[tuple[str, dict[str, float]], ...] = (
    ("h200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),        # H200 and GH200: H100 SXM compute
    ("h100 nvl", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("h100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),        # H100 SXM5 (also "H100 80GB HBM3")
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def forward_macs(model_cfg, src_len: int, tgt_len: int) -> int:
    """Forward multiply-accumulates of ONE sample with these source/target lengths."""
    D, F, V = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size
    S, T = int(src_len), int(tgt_len)
    arch = arch_of(model_cfg)
    I = arch.attention_width(model_cfg)                  # H x head width
    nF = arch.ffn_matrices                               # 2, or 3 for a gated FFN (T5's wi_0, wi_1, wo)
    enc_layer = S * (4 * D * I + nF * D * F) + 2 * S * S * I
    dec_self = T * 4 * D * I + 2 * T * T * I
    dec_cross = 2 * T * D * I + 2 * S * D * I + 2 * T * S * I
    dec_ffn = T * nF * D * F
    output = T * D * V
    return (model_cfg.n_encoder_layers * enc_layer
            + model_cfg.n_decoder_layers * (dec_self + dec_cross + dec_ffn) + output)


def forward_flops(model_cfg, batch_size: int, src_len: int, tgt_len: int) -> float:
    """Forward FLOPs of a batch padded to (src_len, tgt_len)."""
    return 2.0 * batch_size * forward_macs(model_cfg, src_len, tgt_len)


def train_flops(model_cfg, batch_size: int, src_len: int, tgt_len: int, recompute: bool = False) -> float:
    """Training FLOPs (forward + backward) of `batch_size` samples padded to (src_len, tgt_len).

    recompute=False gives model FLOPs (for MFU); True adds the forward that activation
    checkpointing recomputes (hardware FLOPs).
    """
    return (4.0 if recompute else 3.0) * forward_flops(model_cfg, batch_size, src_len, tgt_len)


def train_flops_lengths(model_cfg, src_lens: Iterable[int], tgt_lens: Iterable[int],
                        recompute: bool = False) -> float:
    """Training FLOPs at each sample's real (unpadded) lengths: the useful work of a batch."""
    src_lens, tgt_lens = list(src_lens), list(tgt_lens)
    if len(src_lens) != len(tgt_lens):
        raise ValueError(f"train_flops_lengths: {len(src_lens)} source lengths but {len(tgt_lens)} target lengths")
    macs = sum(forward_macs(model_cfg, s, t) for s, t in zip(src_lens, tgt_lens))
    return (4.0 if recompute else 3.0) * 2.0 * macs


def _device_name(device) -> tuple[str, str]:
    """(type, name) of a torch.device, a string such as 'cuda:0', or None (the current default)."""
    import torch
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda", torch.cuda.get_device_name(device)
    return device.type, device.type


def peak_flops(device=None, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of ONE device for this precision ("bf16" or "fp32"), or None if unknown.

    ENCDEC_PEAK_FLOPS (FLOP/s per device, e.g. 989e12) overrides the table for any device,
    CPUs included. Without it, CPUs and GPUs missing from PEAK_TABLE give None: no MFU is
    reported rather than a made-up one.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"peak_flops: precision must be bf16 or fp32, got {precision!r}")
    env = os.environ.get(ENV_PEAK, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            raise UserError(f"{ENV_PEAK}={env!r} is not a number (FLOP/s per device, e.g. 989e12)") from None
        if not value > 0:
            raise UserError(f"{ENV_PEAK}={env!r} must be > 0")
        return value
    kind, name = _device_name(device)
    if kind != "cuda":
        return None
    key = precision
    if precision == "fp32":
        import torch
        key = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    low = name.lower()
    for pattern, peaks in PEAK_TABLE:
        if pattern in low:
            return peaks[key]
    return None


def mfu(flops_per_step: float, step_time_s: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the peak of all devices."""
    if peak_per_device is None or step_time_s <= 0 or n_devices <= 0:
        return None
    return flops_per_step / step_time_s / (peak_per_device * n_devices)
