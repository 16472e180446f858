"""Non-finite and loss-spike guard: which optimizer steps are skipped, and when to give up.

A step is skipped (identically on every rank; the caller makes the decision global) when its
global loss or gradient norm is not finite, or, with train.spike_z > 0, when its loss is more
than spike_z standard deviations above the mean of the last train.spike_window kept steps (a
rolling z-score, as LLM Foundry's loss-spike callback / OLMo-core's skip-step optimizer do; the
first spike_window // 4 steps are never judged). Skipped steps change nothing but the data
position: no parameter, optimizer moment, Adam step count or LR-schedule change.

After train.max_bad_steps consecutive skips the run stops with one line naming the step
(`Diverged`, exit status 2 through the CLI). We stop rather than roll back: skips in a row mean
the state or the hyperparameters are the problem, not one batch; a rollback to the last
checkpoint with the same config and data order would replay the same steps and diverge the same
way, and the sbatch script must not burn restarts on it. The last good checkpoint is untouched
(no checkpoint is ever written from a skipped state: parameters never change on a skip, and the
save refuses non-finite parameters), so the user lowers optim.lr or sets checkpoint.resume.
The guard's state (counters, loss window) is saved in checkpoints, so a resume decides alike.
"""
from __future__ import annotations

import math

from common.errors import UserError


class Diverged(UserError):
    """Too many consecutive skipped steps (the CLI prints it as one `encdec: error:` line)."""


class StepGuard:
    def __init__(self, max_bad_steps: int, spike_z: float = 0.0, spike_window: int = 100):
        self.max_bad, self.z, self.window = max_bad_steps, spike_z, spike_window
        self.skipped = 0            # skipped steps in the whole run
        self.in_a_row = 0
        self.history: list[float] = []

    def judge(self, loss: float, grad_norm: float | None = None) -> str:
        """Why the step with this global loss (and norm, if known) must be skipped, or ""."""
        if not math.isfinite(loss):
            return f"loss {loss} is not finite"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"grad_norm {grad_norm} is not finite"
        if self.z > 0 and len(self.history) >= max(2, self.window // 4):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            if std > 0 and (loss - mean) / std > self.z:
                return f"loss spike: {loss:.4f} is {(loss - mean) / std:.1f} std above the mean {mean:.4f} " \
                       f"of the last {n} steps (train.spike_z={self.z})"
        return ""

    def record(self, step: int, loss: float, why: str) -> None:
        """After the step: counts a skip (raising Diverged past max_bad_steps) or keeps the loss."""
        if why:
            self.skipped += 1
            self.in_a_row += 1
            if self.max_bad and self.in_a_row >= self.max_bad:
                raise Diverged(f"training diverged: {self.in_a_row} consecutive steps skipped up to step {step} "
                               f"(train.max_bad_steps={self.max_bad}; last: {why}); the last checkpoint is good: "
                               f"lower optim.lr or resume from an earlier one (checkpoint.resume=TAG)")
            return
        self.in_a_row = 0
        if self.z > 0:
            self.history = (self.history + [loss])[-self.window:]

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "bad_in_a_row": self.in_a_row, "loss_window": list(self.history)}

    def load_state_dict(self, d: dict) -> None:
        self.skipped = int(d.get("skipped_steps", 0))
        self.in_a_row = int(d.get("bad_in_a_row", 0))
        self.history = [float(x) for x in d.get("loss_window", [])]
