"""Learning-rate schedules as multipliers of optim.lr (for torch's LambdaLR)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """step counts optimizer steps from 0. Linear warmup to 1 over `warmup` steps, then:
    inverse_sqrt: sqrt(warmup / step) (the paper's d^-0.5 * min(step^-0.5, step * warmup^-1.5), normalised);
    cosine: half-cosine from 1 to min_ratio at `total`; constant: 1."""
    s = step + 1
    if warmup > 0 and s <= warmup:
        return s / warmup
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / s)
    if schedule == "cosine":
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0
