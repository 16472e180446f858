"""Counting host synchronisations: every way a tensor's value reaches Python, and every explicit
stream / device synchronize, attributed to the code that asked for it.

On a GPU each of these makes the host wait for the device's queue (the device idles until the host
queues more work). On the CPU they cost nothing, so a CPU test can only see them by counting the
calls. Not counted: .numpy(), which raises on a device tensor (so it can only read host data).

Each call is attributed by its stack: "deepspeed" when DeepSpeed's code made it (its ZeRO step's
overflow check), "torch.optim" when a torch optimizer read its step counter (a CPU tensor by
design; the trainer's fused AdamW on CUDA keeps it on the device), else "project:<function>" of the
innermost frame in the project's own code (launcher/, model/, data/).
"""
from __future__ import annotations

import collections
import os
import traceback
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tuple(os.path.join(ROOT, p) + os.sep for p in ("launcher", "model", "data"))
METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")


def _category(stack) -> str:
    frames = list(reversed(stack))                 # innermost first
    inner = frames[0].filename
    if os.sep + "torch" + os.sep + "optim" + os.sep in inner:
        return "torch.optim"
    for f in frames:
        if f.filename.startswith(PROJECT):
            return f"project:{f.name}"
        if os.sep + "deepspeed" + os.sep in f.filename:
            return "deepspeed"
    return "other"


class HostSyncs:
    """Patches the counted calls (process-wide) while installed; counts while `active`."""

    def __init__(self):
        self.active = False
        self.counts: collections.Counter = collections.Counter()
        self._orig = {}

    def _wrap(self, owner, name):
        orig = getattr(owner, name)
        self._orig[(owner, name)] = orig
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                counter.active = False                  # the traceback machinery must not count itself
                try:
                    counter.counts[_category(traceback.extract_stack()[:-1])] += 1
                finally:
                    counter.active = True
            return orig(*args, **kwargs)
        setattr(owner, name, wrapper)

    def install(self) -> "HostSyncs":
        for m in METHODS:
            self._wrap(torch.Tensor, m)
        self._wrap(torch.cuda, "synchronize")
        self._wrap(torch.cuda.Stream, "synchronize")
        self._wrap(torch.cuda.Event, "synchronize")
        from deepspeed.accelerator import get_accelerator
        acc = type(get_accelerator())
        self._wrap(acc, "synchronize")
        return self

    def uninstall(self) -> None:
        for (owner, name), orig in self._orig.items():
            setattr(owner, name, orig)

    @contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def take(self) -> dict:
        out = dict(self.counts)
        self.counts.clear()
        return out
