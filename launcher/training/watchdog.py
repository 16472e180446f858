"""Hang watchdog: one thread per rank; no progress for train.hang_timeout_s -> a message naming
the rank, the step and the phase, then the process exits (status 3) so the job ends and restarts.

The trainer calls beat(step, phase) at every phase change (data, forward/backward, optimizer,
checkpoint, eval). Each rank also publishes its last beat in the process group's key-value store,
so the rank that fires can name the rank that is behind (a stopped or stuck peer cannot speak for
itself: its own thread is stuck too, or frozen by SIGSTOP). Python stacks of every thread of the
firing rank go to stderr (faulthandler). Keep hang_timeout_s well under train.collective_timeout_s
(and, on GPUs, NCCL's own timeout): the watchdog is what names the culprit.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time

EXIT_HANG = 3
STARTUP_S = 120.0       # until this rank's first step is done (engine build, loader start, slower peers)


def _own_store_client():
    """A client of the rendezvous key-value store (MASTER_ADDR:MASTER_PORT) for this thread alone,
    so heartbeats never share a connection with the main thread's collectives; None if unreachable."""
    import datetime

    import torch.distributed as dist
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10),
                             wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - heartbeats are a nicety; the local check works without them
        print(f"watchdog: no heartbeats ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, world: int, store=None, poll_s: float | None = None):
        self.timeout, self.rank, self.world, self.store = timeout_s, rank, world, store
        self.poll = poll_s or max(0.2, min(5.0, timeout_s / 10))
        self.step, self.phase, self.t = 0, "start", time.monotonic()
        self.first_step = None              # the step this process started at; a later one = trained
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        if self.timeout > 0 and self.store is None:
            self.store = _own_store_client()
        if self.timeout > 0:
            self._publish()                       # this rank is known from the start
            self._thread = threading.Thread(target=self._run, name="encdec-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        if self.first_step is None and phase == "forward/backward":
            self.first_step = step
        self.step, self.phase, self.t = step, phase, time.monotonic()

    def limit(self) -> float:
        """The allowed silence: train.hang_timeout_s, but at least STARTUP_S until the first step is done."""
        started = self.first_step is not None and self.step > self.first_step
        return self.timeout if started else max(self.timeout, STARTUP_S)

    def close(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"encdec/beat/{self.rank}", json.dumps(
                {"step": self.step, "phase": self.phase, "wall": time.time()}))
        except Exception as e:  # noqa: BLE001 - the store may be gone with a dead rank 0; the local check works
            print(f"watchdog: rank {self.rank}: heartbeats off ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            self.store = None

    def _peers(self) -> str:
        """The ranks whose last published beat is oldest (the likely culprits), as text."""
        if self.store is None:
            return ""
        beats = {}
        for r in range(self.world):
            try:
                if not self.store.check([f"encdec/beat/{r}"]):
                    raise KeyError(r)
                beats[r] = json.loads(self.store.get(f"encdec/beat/{r}"))
            except Exception:  # noqa: BLE001
                beats[r] = None
        now = time.time()
        silent = [r for r, b in beats.items() if b is None or now - b["wall"] > min(self.timeout, 2 * self.poll + 1)]
        behind = min((b["step"] for b in beats.values() if b), default=None)
        parts = [f"rank {r}: " + ("no beat" if beats[r] is None else
                                  f"step {beats[r]['step']} {beats[r]['phase']}, silent {now - beats[r]['wall']:.0f} s")
                 for r in sorted(set(silent) | {r for r, b in beats.items() if b and b["step"] == behind})]
        return "; ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._publish()
            idle = time.monotonic() - self.t
            if idle > self.limit():
                peers = self._peers()
                print(f"encdec: hang: rank {self.rank} made no progress for {idle:.0f} s "
                      f"(train.hang_timeout_s={self.timeout:g}) at step {self.step}, phase {self.phase}"
                      + (f"; last beats: {peers}" if peers else "") + "; exiting so the job restarts",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(EXIT_HANG)
