"""Stop requests from the scheduler: SIGUSR1 (Slurm's time-limit warning) and SIGTERM (preemption).

Installed first thing in a rank (before the slow imports and engine set-up), so a signal that
arrives during start-up is remembered instead of killing the process. The trainer checks
`requested` once per step and all ranks agree (all-reduce MAX) to stop at the same step.
"""
from __future__ import annotations

import signal


class StopSignal:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum
