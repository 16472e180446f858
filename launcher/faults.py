"""Fault injection for the fault-tolerance tests, owned here and read once per start.

The training entry (launcher/train.py) reads the switches from the environment once, before the
trainer exists, and hands the trainer and the checkpoint manager a Faults object; nothing else in
the library reads them, and with none set every hook is a no-op. The switches:

    ENCDEC_FAULT=rank:step              that rank exits (status 17) before step `step` (0-based)
    ENCDEC_FAULT_NAN=rank:step          that rank's first micro-batch of that step gives a NaN loss
                                        (a poisoned batch)
    ENCDEC_FAULT_STEP_DELAY=S           sleep S seconds before every step (the chaos soak's pacing,
                                        so its signals land while training runs; numerics unchanged)
    ENCDEC_CKPT_KILL=rank:point:tag     SIGKILL that rank at that point of that save: ds-file (after
                                        each DeepSpeed file), files-written, before-rename, before-latest
    ENCDEC_RESHARD=always               resume through the resharding path on the same layout too
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

VARS = ("ENCDEC_FAULT", "ENCDEC_FAULT_NAN", "ENCDEC_FAULT_STEP_DELAY", "ENCDEC_CKPT_KILL", "ENCDEC_RESHARD")


def _pair(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    r, s = spec.split(":")
    return int(r), int(s)


@dataclass(frozen=True)
class Faults:
    exit_at: tuple[int, int] | None = None       # (rank, step)
    nan_at: tuple[int, int] | None = None        # (rank, step)
    step_delay: float = 0.0
    ckpt_kill: tuple[int, str, str] | None = None   # (rank, point, tag)
    reshard_always: bool = False

    @classmethod
    def from_env(cls, env=None) -> "Faults":
        env = os.environ if env is None else env
        kill = env.get("ENCDEC_CKPT_KILL")
        if kill:
            r, p, t = kill.split(":", 2)
            kill = (int(r), p, t)
        return cls(exit_at=_pair(env.get("ENCDEC_FAULT")), nan_at=_pair(env.get("ENCDEC_FAULT_NAN")),
                   step_delay=float(env.get("ENCDEC_FAULT_STEP_DELAY") or 0.0), ckpt_kill=kill or None,
                   reshard_always=env.get("ENCDEC_RESHARD") == "always")

    def before_step(self, step: int, rank: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.exit_at == (rank, step):
            print(f"ENCDEC_FAULT: rank {rank} exits at step {step}", flush=True)
            os._exit(17)

    def poison(self, loss, step: int, rank: int, micro: int):
        if micro == 0 and self.nan_at == (rank, step):
            print(f"ENCDEC_FAULT_NAN: rank {rank} poisons step {step}", flush=True)
            return loss * float("nan")
        return loss

    def at_checkpoint(self, point: str, rank: int, tag: str) -> None:
        if self.ckpt_kill == (rank, point, tag):
            print(f"ENCDEC_CKPT_KILL: rank {rank} killed at '{point}'", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


NONE = Faults()
