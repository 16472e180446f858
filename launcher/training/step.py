"""One optimizer step, as a unit the trainer and the benchmarks build through the same constructor.

    step = TrainStep(cfg, mesh, device, accum, guard)       # builds the DeepSpeed engine (engine.py)
    out = step(batches, index)                               # `accum` host micro-batches -> StepOut

Batch arithmetic: every rank moves its `accum` micro-batches to the device first and the target
token count is summed over the data-parallel group (on the device), so each micro-batch's backward
carries exactly its share of the global mean loss (sum of token losses / target tokens of the
global batch): the result equals one process on the same global batch, whatever dp and accum are.

Host synchronisation: one per step. Nothing is read back from the device but the step guard's
verdict: the global loss (and, without ZeRO, the gradient norm), read together once (`.tolist()`
of one small tensor). Token counts stay on the device (the trainer reads
them on logging steps); batches are inspected on the host (numpy) before they move; host-to-device
copies go through pinned memory (no implicit stream sync). DeepSpeed's own ZeRO step adds its
overflow check (the non-finite gradient-norm test the guard relies on at ZeRO 1-3).

The guard (launcher/training/guard.py) decides the same on every rank whether to skip the step:
with ZeRO, before the last micro-batch's backward, which then carries NaN so DeepSpeed's overflow
check (a non-finite global gradient norm, computed inside engine.step) drops the gradients and
skips the optimizer and scheduler; without ZeRO, after the backward (the trainer clips itself and
sees the norm), dropping the gradients and restoring the scheduler here.

Precision: the first step of each process records the dtype its matmuls ran in (precision.py,
MatmulDtypes over the first micro-batch's forward; that step runs eager, even with train.compile)
and stops with one line if that is not train.precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from launcher.faults import NONE, Faults
from launcher.monitor import flops
from launcher.parallel.dims import Mesh
from launcher.parallel.tp import clip_grad_norm_tp
from launcher.precision import MatmulDtypes, precision_of
from launcher.training.engine import all_reduce, build_engine, to_device
from launcher.training.guard import StepGuard


@dataclass
class StepOut:
    loss: float                 # the global mean token loss
    skip: str                   # why the guard skipped the step ("" = applied)
    counts: torch.Tensor        # (2,) float64 on the device: global target and source tokens
    flops: float                # this rank's model FLOPs (padded shapes)
    pad_frac: float             # mean padding share of this rank's micro-batches


def unpadded(b: dict) -> bool:
    """A host batch without source padding (packed span data), read with numpy: no device involved."""
    return bool(b["src_mask"].numpy().all())


class TrainStep:
    def __init__(self, cfg, mesh: Mesh, device: str, accum: int, guard: StepGuard, watchdog=None,
                 faults: Faults = NONE, rank: int = 0):
        self.cfg, self.mesh, self.device, self.accum, self.guard = cfg, mesh, device, accum, guard
        self.watchdog, self.faults, self.rank = watchdog, faults, rank
        self.engine, self.scheduler = build_engine(cfg, mesh, device, accum)
        self.precision = precision_of(cfg)
        self.zero = cfg.parallel.zero_stage
        self.checked_precision = False
        self.matmul_dtypes: dict = {}
        self._norm = torch.zeros(1, dtype=torch.float64, device=device)   # ZeRO 0: the last gradient norm

    def _beat(self, step: int, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step, phase)

    def grad_norm(self) -> torch.Tensor:
        """(1,) on the device: the global gradient norm of the last step, before clipping."""
        if self.zero == 0:
            return self._norm
        g = self.engine.get_global_grad_norm()          # DeepSpeed: a tensor or a float (None: not computed)
        if torch.is_tensor(g):
            return g.detach().reshape(1).to(torch.float64)
        return torch.full((1,), float(g or 0.0), dtype=torch.float64, device=self.device)

    def __call__(self, batches: list[dict], step: int) -> StepOut:
        if self.checked_precision:
            return self._step(batches, step)
        # The first step runs eager, backward too (train.compile's code compiles from the second):
        # a compiled function whose first call meets the precision check's dispatch mode is never
        # compiled afterwards (dynamo skips its frame for good), and a checkpointed layer must
        # recompute in backward what its forward ran.
        with torch.compiler.set_stance("force_eager"):
            return self._step(batches, step)

    def _step(self, batches: list[dict], step: int) -> StepOut:
        no_pad = [unpadded(b) for b in batches]
        local_flops = sum(flops.train_flops(self.cfg.model, b["src"].shape[0], b["src"].shape[1],
                                            b["tgt_in"].shape[1], recompute=False) for b in batches)
        pad_frac = sum(b["pad_frac"] for b in batches) / len(batches)
        dev = [to_device(b, self.device) for b in batches]
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in dev:                                   # summed on the device: no host read
            local[0] += (b["labels"] != -100).sum()
            local[1] += b["src_mask"].sum()
        counts = all_reduce(local, self.device, self.mesh.dp_group)
        scale = (self.mesh.dp * self.accum) / counts[0].clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        why, verdict = "", None
        self._beat(step, "forward/backward")
        for i, (b, plain) in enumerate(zip(dev, no_pad)):
            last = i == len(dev) - 1
            # no padding (packed span data): no attention mask, so SDPA may take its flash kernel
            segments = {"src_segments": b["src_segments"]} if "src_segments" in b else {}
            record = MatmulDtypes() if not self.checked_precision else contextlib.nullcontext()
            with record as rec:
                loss, _ = self.engine(b["src"], None if plain else b["src_mask"], b["tgt_in"], b["labels"],
                                      **segments)
            if not self.checked_precision:
                self.matmul_dtypes = rec.seen             # what the first step's matmuls ran in
                self.precision.check_matmuls(rec.seen)
                self.checked_precision = True
            loss = self.faults.poison(loss, step, self.rank, i)
            loss_sum += loss.detach().double()
            factor = scale
            if last and self.zero:                      # ZeRO 1-3: decide before the last backward
                verdict = self._verdict(loss_sum, counts)
                why = self.guard.judge(verdict[0])
                if why:
                    factor = float("nan")               # DeepSpeed sees a non-finite norm and skips
            self.engine.backward(loss * factor)
            if last and not self.zero:
                # Without ZeRO, DeepSpeed clips but does not report the norm: clip here (TP-aware:
                # each sharded gradient summed over the TP group, replicated ones counted once).
                norm = clip_grad_norm_tp(self.engine.module.parameters(), self.cfg.optim.grad_clip or float("inf"),
                                         self.mesh.tp_group)
                self._norm.copy_(norm.reshape(1))
                verdict = self._verdict(loss_sum, counts, self._norm)
                why = self.guard.judge(verdict[0], verdict[1])
                if why:
                    self._skip_without_zero()
                    continue
            if last:
                self._beat(step, "optimizer")
            self.engine.step()
        if self.zero and self.engine.optimizer.overflow and not why:
            why = "grad_norm is not finite"
        elif self.zero and why and not self.engine.optimizer.overflow:
            raise RuntimeError("DeepSpeed applied a step the guard skipped (its overflow check did not fire)")
        return StepOut(loss=verdict[0], skip=why, counts=counts, flops=local_flops, pad_frac=pad_frac)

    def _verdict(self, loss_sum: torch.Tensor, counts: torch.Tensor, norm: torch.Tensor | None = None) -> list:
        """The step's one host read: [global mean loss, (gradient norm)]."""
        loss = all_reduce(loss_sum.reshape(1), self.device, self.mesh.dp_group) / counts[0].clamp(min=1.0)
        return torch.cat([loss] + ([norm] if norm is not None else [])).tolist()

    def _skip_without_zero(self) -> None:
        """ZeRO 0: engine.step() with no gradients (the optimizer leaves every parameter and moment
        alone), then the LR schedule put back (DeepSpeed steps it regardless)."""
        for p in self.engine.module.parameters():
            p.grad = None
        saved = self.scheduler.state_dict() if self.scheduler else None
        self.engine.step()
        if saved is not None:
            self.scheduler.load_state_dict(saved)
            for g, lr in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr

