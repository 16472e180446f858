"""Stop requests: SIGUSR1 (Slurm's time-limit warning), SIGTERM (scancel, preemption) and SIGINT
(Ctrl-C on a local run).

Installed first thing in a rank (before the slow imports and engine set-up), so a signal that
arrives during start-up is remembered instead of killing the process. The trainer checks
`requested` once per step and all ranks agree (all-reduce MAX) to stop at the same step, save a
checkpoint there and exit. A second Ctrl-C exits at once (KeyboardInterrupt, status 130).
Loader workers and `pipe:` commands ignore these signals (data/procs.py): only this process acts.
"""
from __future__ import annotations

import signal
import sys
import time

DOUBLE_PRESS_S = 1.0    # a second INT sooner than this is the same Ctrl-C (torchrun forwards the terminal's)


class StopSignal:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._first_int = 0.0

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self._first_int:
            if time.monotonic() - self._first_int > DOUBLE_PRESS_S:
                print("Ctrl-C again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
                raise KeyboardInterrupt                # the second Ctrl-C: leave now, no checkpoint
            return
        if signum == signal.SIGINT:
            self._first_int = time.monotonic()
            print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)
        if not self.requested:
            self.requested, self.signum = True, signum
