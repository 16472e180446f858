"""Mixed precision, owned in one place: what `train.precision` means for every consumer.

    fp32   everything in fp32
    bf16   fp32 master weights, gradients and optimizer state; matmuls and attention in bf16 under
           torch.autocast, entered by DeepSpeed's engine around its forward (the `torch_autocast`
           section of its config, precision.deepspeed_config()); gradients reduced in fp32

Why autocast through DeepSpeed's `torch_autocast` section, and not DeepSpeed's own `bf16` mode:
  - DeepSpeed's engine forward switches an outer torch.autocast OFF unless its config has an enabled
    `torch_autocast` section (deepspeed/runtime/torch_autocast.py: autocast_if_enabled; it tests
    torch.is_autocast_enabled(), which without an argument means CUDA autocast, so only GPU runs
    were affected). With the section the engine enters autocast itself, on every device.
  - DeepSpeed's `bf16` mode keeps bf16 weights and runs everything the model does in bf16: the
    residual stream, LayerNorm statistics, the loss; the checkpoint then holds bf16 module weights
    (fp32 masters only in the optimizer files), which changes the checkpoint format, export and
    resharded resume, and its ZeRO-0 optimizer computes a wrong TP gradient norm (DeepSpeed 0.19).
    Under autocast the weights, the residual stream and the loss stay fp32 and only the matmuls
    (the FLOPs) run in bf16; the checkpoint format is the same in both precisions.
  - bench/precision.py measures both side by side (step time, peak memory, loss against fp32).
Gradient reduction: the section's default would tag every nn.Linear weight to be reduced in bf16
(`lower_precision_safe_modules`); encdec sets that list empty, so gradients are reduced in fp32:
the sum over data-parallel ranks then equals one process's gradient (the project's layout-
independence guarantee) instead of depending on how many bf16 partial sums were rounded.

Consumers: the engine config (launcher/training/engine.py), the trainer's first-step check
(check_matmuls: every rank records the dtype its matmuls ran in and stops with one line if it is
not train.precision), evaluation and generation of exported folders (dtype()), the planner
(matmul_bytes) and the benchmarks (autocast() for work outside a DeepSpeed engine).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from common.errors import UserError

NAMES = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PrecisionError(UserError):
    """The matmuls did not run in the configured precision."""


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"train.precision must be one of {', '.join(NAMES)}, got {self.name!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls and attention run in."""
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @property
    def matmul_bytes(self) -> int:
        """Bytes per element of matmul operands (what autocast saves for backward)."""
        return torch.empty((), dtype=self.compute_dtype).element_size()

    def deepspeed_config(self) -> dict:
        """The part of DeepSpeed's config that gives this precision: fp32 engine, autocast in its forward."""
        if not self.mixed:
            return {}
        return {"torch_autocast": {"enabled": True, "dtype": str(self.compute_dtype).removeprefix("torch."),
                                   "lower_precision_safe_modules": []}}     # gradients reduced in fp32

    def autocast(self, device: str | torch.device):
        """torch.autocast for work outside a DeepSpeed engine (a bare loop, a stock HF model)."""
        kind = torch.device(device).type
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(kind, dtype=self.compute_dtype)

    def inference(self, device: str | torch.device):
        """The context evaluation and generation run in: autocast() and, on a GPU, scaled-dot-product
        attention without its cuDNN backend. Inference shapes change from batch to batch (lengths,
        every decoding step), and cuDNN builds an execution plan per new shape: on an H200 that made
        bf16 evaluation 3.7x slower than fp32 (which cuDNN does not serve); flash and memory-efficient
        attention need no plan. Training shapes repeat, and training keeps cuDNN."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast(device))
        if torch.device(device).type == "cuda":
            stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                             SDPBackend.MATH]))
        return stack

    def inference_name(self, device: str | torch.device) -> str:
        """The precision an exported model runs in for evaluation and generation (autocast over its
        fp32 weights, as in training): the training precision on a GPU; fp32 on the CPU (bf16
        autocast there is no faster, bench/inference.py, and equal only within bf16 rounding)."""
        return self.name if torch.device(device).type == "cuda" else "fp32"

    def check_matmuls(self, seen: dict[str, set]) -> None:
        """Raises PrecisionError (one line) unless every recorded matmul ran in compute_dtype."""
        want = self.compute_dtype
        wrong = {op: sorted(str(d).removeprefix("torch.") for d in ds if d != want) for op, ds in seen.items()}
        wrong = {op: ds for op, ds in wrong.items() if ds}
        if not seen:
            raise PrecisionError("train.precision check: no matmul ran in the first forward (nothing to check)")
        if wrong:
            ops = ", ".join(f"{op} in {'/'.join(ds)}" for op, ds in sorted(wrong.items()))
            raise PrecisionError(f"train.precision={self.name} but the first step's matmuls ran as {ops} "
                                 f"(expected {str(want).removeprefix('torch.')} everywhere)")


def precision_of(cfg) -> Precision:
    """The Precision of a RunConfig (train.precision)."""
    return Precision(cfg.train.precision)


# aten ops whose floating inputs are what "the matmul ran in": every linear layer (projections, FFN,
# output layer and the chunked loss) reaches the kernels as mm/addmm, fused attention as one of the
# attention kernels. SDPA's math path (the CPU with attention dropout, or a GPU without a fitting
# fused kernel) is not listed: PyTorch computes it from the bf16 q/k/v in fp32 on purpose (accuracy
# of the softmax), and its inputs are the outputs of the projections checked above.
_MATMULS = ("mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_flash_attention_forward", "_efficient_attention_forward")


class MatmulDtypes(TorchDispatchMode):
    """Records {op name: input dtypes} of every matmul-like operator dispatched while active.

    Forward only is what matters (backward ops run in the forward's dtypes). Compiled code must
    run eagerly while it is active (torch.compiler.set_stance("force_eager"), as the trainer's
    first step does: launcher/training/step.py): the record then holds the ops as autocast
    dispatched them, which inductor keeps."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in _MATMULS:
            ds = {a.dtype for a in args[:3] if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(name, set()).update(ds)
        return func(*args, **(kwargs or {}))
