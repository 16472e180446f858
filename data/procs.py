"""Stop signals in the helper processes of a rank (loader workers, `pipe:` commands).

Slurm sends USR1/TERM (scancel, preemption, `--signal` without B:) to every process of a job
step, and Ctrl-C sends INT to the terminal's whole process group. Only a rank's main process may
act on them: it agrees a stop step with the other ranks, saves a checkpoint and then ends its
helpers itself. So:
  - `pipe:` commands run in their own session with the three signals ignored (SIG_IGN survives
    exec, so the shell and what it starts keep ignoring them); they end when their reader closes
    them (SIGKILL) or goes away (SIGPIPE).
  - loader workers ignore USR1 and INT, and take TERM only from their parent: the loader's own
    shutdown terminates a worker that does not leave in time (PyTorch's worker handler exits on
    the parent's TERM and dies of anyone else's; we keep the first half). TERM stays blocked in
    the worker and one thread reads it with sigwaitinfo, which says who sent it.
  - the main process blocks the three signals while it starts workers (`blocked()`), so one that
    arrives between the fork and the worker's set-up is held, not fatal: the child inherits the
    mask, the parent gets its pending signal when it unblocks.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals() -> None:
    """In a `pipe:` command (preexec_fn): USR1/TERM/INT ignored, also by what it execs."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def blocked():
    """USR1/TERM/INT held (not lost) in this thread while it forks helper processes."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_init(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: see the module doc."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})    # before any other thread starts
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGINT})
    parent = os.getppid()

    def term_from_parent_only():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:              # the loader shutting this worker down
                os._exit(0)

    threading.Thread(target=term_from_parent_only, name="encdec-sigterm", daemon=True).start()
