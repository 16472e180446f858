"""Measuring what the planner predicts: live tensor bytes and collective bytes of real steps.

PeakMemory: a TorchDispatchMode that sees every tensor an operator returns, registers its
storage once (weak reference, so the count drops when the storage is freed) and tracks the sum
of live storage bytes and its maximum. This is the memory the planner models (tensors), on any
device, without allocator caching or fragmentation; on CPU it is the reliable figure (RSS mixes
in the allocator, libraries and freed-but-kept pages). Tensors that exist before entering
(e.g. weights built outside) are not counted unless passed to `include`.

HostSyncs: counts the host synchronisations of a piece of code (below).

CollectiveBytes: wraps torch.distributed's collectives (all_reduce, reduce_scatter(_tensor),
all_gather(_into_tensor), broadcast, ...) while active and adds the bytes of the tensor each
rank contributes, per operation and per process group size, as the planner counts them.
"""
from __future__ import annotations

import collections
import os
import traceback
import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self, include=()):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}
        for t in include:
            self._track(t)

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        ref = self._seen.get(key)
        if ref is not None and ref() is st:
            return
        n = st.nbytes()
        self.current += n
        self.peak = max(self.peak, self.current)

        def freed(_ref, n=n, key=key):
            self.current -= n
            if self._seen.get(key) is _ref:
                del self._seen[key]
        self._seen[key] = weakref.ref(st, freed)

    def reset_peak(self):
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


_COLLECTIVES = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor",
                "broadcast", "reduce", "all_to_all_single", "_all_gather_base", "_reduce_scatter_base",
                "all_reduce_coalesced", "_all_gather_base_coalesced")
_GATHER = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "_all_gather_base_coalesced")
_SCATTER = ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveBytes:
    """Counts bytes per (op, group size): all_reduce / broadcast count the tensor; all_gather counts
    the output (the gathered whole); reduce_scatter counts the input (the whole being reduced)."""

    def __init__(self):
        self.bytes: dict[tuple[str, int], int] = defaultdict(int)
        self.calls: dict[tuple[str, int], int] = defaultdict(int)
        self._saved = {}
        self._depth = 0

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:
                for a in args:
                    if isinstance(a, dist.ProcessGroup):
                        group = a
            n = dist.get_world_size(group)
            if name in _GATHER:
                data = next((kwargs[k] for k in ("tensor_list", "output_tensor_list", "output_tensor", "output_tensors")
                             if k in kwargs), args[0] if args else None)
            elif name in _SCATTER:
                data = next((kwargs[k] for k in ("input_list", "input", "input_tensor") if k in kwargs),
                            args[1] if len(args) > 1 else None)
            else:
                data = next((kwargs[k] for k in ("tensor", "tensors") if k in kwargs), args[0] if args else None)
            if n > 1 and not self._depth:
                key = ("reduce_scatter" if "reduce_scatter" in name else "all_gather" if "all_gather" in name
                       else name, n)
                self.bytes[key] += _nbytes(data)
                self.calls[key] += 1
            self._depth += 1                           # one collective calling another counts once
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapped

    def __enter__(self):
        import deepspeed.comm as dscomm          # DeepSpeed calls torch.distributed through its own module
        mods = [dist, dist.distributed_c10d]
        cdb = getattr(dscomm.comm, "cdb", None)          # DeepSpeed's backend keeps two functions it looked up
        for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                           ("reduce_scatter_function", "reduce_scatter_tensor")):
            fn = getattr(cdb, attr, None)
            if fn is not None and not getattr(fn, "_counted", False):
                w = self._wrap(name, fn)
                w._counted = True
                self._saved[(cdb, attr)] = fn
                setattr(cdb, attr, w)
        for mod in mods:
            for name in _COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is not None and not getattr(fn, "_counted", False):
                    w = self._wrap(name, fn)
                    w._counted = True
                    self._saved[(mod, name)] = fn
                    setattr(mod, name, w)
        return self

    def __exit__(self, *exc):
        for (mod, name), fn in self._saved.items():
            setattr(mod, name, fn)
        self._saved.clear()
        return False

    def total(self, op: str | None = None) -> int:
        return sum(b for (o, _), b in self.bytes.items() if op is None or o == op)


# ----------------------------------------------------------------------------- host synchronisations
# Every way a tensor's value reaches Python, and every explicit stream / device synchronize, counted
# and attributed to the code that asked for it. On a GPU each makes the host wait for the device's
# queue; on the CPU they cost nothing, so a CPU run can only see them by counting the calls. Not
# counted: .numpy(), which raises on a device tensor (so it can only read host data). Each call is
# attributed by its stack: "deepspeed" when DeepSpeed's code made it (its ZeRO step's overflow
# check), "torch.optim" when a torch optimizer read its step counter (a CPU tensor by design; the
# trainer's fused AdamW on CUDA keeps it on the device), else "project:<function>" of the innermost
# frame in the project's own code (launcher/, model/, data/).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tuple(os.path.join(_ROOT, p) + os.sep for p in ("launcher", "model", "data"))
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
