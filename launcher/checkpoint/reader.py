"""Reading a training checkpoint of any layout as whole (unsharded) tensors, one parameter at a time.

A checkpoint tag folder (trainer_state.json names its "format"):

  deepspeed    what DeepSpeed's engine.save_checkpoint writes, per tensor-parallel rank r:
                 ZeRO 0    mp_rank_{r:02d}_model_states.pt                module (fp32) + torch optimizer state
                 ZeRO 1/2  mp_rank_{r:02d}_model_states.pt                module, param_shapes (flattening order)
                           zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt
                                 data-parallel rank d's slice [d*P, (d+1)*P) of each param group's flat
                                 fp32 vector (the params back to back) and the Adam state of that slice
                 ZeRO 3    zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt   param_shapes
                           zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt
                                 slice d of every parameter (ceil(numel/dp) elements each, zero padded),
                                 back to back, and its Adam state
  layout-free  model.safetensors (+ optimizer.safetensors "exp_avg/NAME", "exp_avg_sq/NAME"): whole
               tensors keyed by parameter name; what `encdec import` writes
  hf           a Hugging Face folder of a registered architecture (weights only; hf_folder.py)

Files are opened with torch.load(mmap=True, weights_only=True) (or safetensors' lazy reader): a
tensor's pages are read only when it is copied out, so gathering the weights never reads the
optimizer state and memory stays near one parameter plus the output.
Tensor-parallel shards are joined along the dimension the TP plan split them (launcher/parallel/plan.py).
"""
from __future__ import annotations

import math
import os

import torch

from launcher.checkpoint.format import CheckpointError, load_pt, read_state
from launcher.config import config_from_dict
from launcher.parallel.plan import shard_dims
from model import build

KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


# ----------------------------------------------------------------------------- one TP rank's shards

class _Zero0:
    """ZeRO 0: the module and the torch optimizer state of one TP rank, whole."""

    def __init__(self, tag_dir: str, r: int, group_names: list[list[str]] | None):
        self.sd = load_pt(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
        self.module = self.sd["module"]
        opt = self.sd.get("optimizer") or {}
        self.state = opt.get("state") or {}
        self.index = {}
        if group_names and opt:
            ids = [i for g in opt["param_groups"] for i in g["params"]]
            names = [n for g in group_names for n in g]
            if len(ids) != len(names):
                raise CheckpointError(f"{tag_dir}: the optimizer has {len(ids)} parameters, "
                                      f"trainer_state.json names {len(names)}")
            self.index = dict(zip(names, ids))

    def shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.module.items()}

    def has_optimizer(self) -> bool:
        return bool(self.state) and bool(self.index)

    def step(self) -> int | None:
        for s in self.state.values():
            return int(s["step"])
        return None

    def get(self, name: str, key: str) -> torch.Tensor:
        if key == "fp32":
            return self.module[name].float()
        return self.state[self.index[name]][key]


class _ZeroFiles:
    """Per-dp-rank optimizer-state files of one TP rank, opened lazily (memory-mapped)."""
    STATE = ""                                           # key of the base optimizer's state dict

    def _osd(self, d: int) -> dict:
        if d not in self._open:
            self._open[d] = load_pt(self.files[d])["optimizer_state_dict"]
        return self._open[d]

    def shapes(self) -> dict:
        return {n: s for n, (_, _, s) in self.where.items()}

    def has_optimizer(self) -> bool:
        return bool(self._osd(0)[self.STATE]["state"])

    def step(self) -> int | None:
        for s in self._osd(0)[self.STATE]["state"].values():
            return int(s["step"])
        return None


class _Zero12(_ZeroFiles):
    """ZeRO 1/2: params laid back to back per group; dp rank d holds [d*P, (d+1)*P) of each group."""
    STATE = "base_optimizer_state"

    def __init__(self, tag_dir: str, r: int, dp: int):
        self.files = [os.path.join(tag_dir, f"zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt") for d in range(dp)]
        self._open: dict[int, dict] = {}
        model = load_pt(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
        pads = self._osd(0).get("param_alignment_paddings")
        self.where = {}                                      # name -> (group, offset, shape)
        for g, shapes in enumerate(model["param_shapes"]):
            off = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self.where[name] = (g, off, tuple(shape))
                off += _numel(shape) + (pads[g][i] if pads else 0)
        self.part = [t.numel() for t in self._osd(0)["single_partition_of_fp32_groups"]]


    def _flat(self, d: int, g: int, key: str) -> torch.Tensor:
        o = self._osd(d)
        if key == "fp32":
            return o["single_partition_of_fp32_groups"][g]
        return o["base_optimizer_state"]["state"][g][key]

    def get(self, name: str, key: str) -> torch.Tensor:
        g, off, shape = self.where[name]
        n, P = _numel(shape), self.part[g]
        out = torch.empty(n, dtype=torch.float32)
        for d in range(len(self.files)):
            lo, hi = max(off, d * P), min(off + n, (d + 1) * P)
            if lo < hi:
                out[lo - off:hi - off] = self._flat(d, g, key)[lo - d * P:hi - d * P]
        return out.view(shape)


class _Zero3(_ZeroFiles):
    """ZeRO 3: every param split in dp slices of ceil(numel/dp) elements, back to back on each rank."""
    STATE = "optimizer_state_dict"

    def __init__(self, tag_dir: str, r: int, dp: int):
        self.files = [os.path.join(tag_dir, f"zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt") for d in range(dp)]
        self._open: dict[int, dict] = {}
        model = load_pt(os.path.join(tag_dir, f"zero_pp_rank_0_mp_rank_{r:02d}_model_states.pt"))
        self.where, off = {}, 0
        for shapes in model["param_shapes"]:
            for name, shape in shapes.items():
                pn = math.ceil(_numel(shape) / dp)
                self.where[name] = (off, pn, tuple(shape))
                off += pn
        sizes = [t.numel() for t in self._osd(0)["fp32_flat_groups"]]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]


    def _range(self, d: int, a: int, b: int, key: str) -> list[torch.Tensor]:
        o, out = self._osd(d), []
        for i in range(len(self.starts) - 1):
            lo, hi = max(a, self.starts[i]), min(b, self.starts[i + 1])
            if lo < hi:
                flat = o["fp32_flat_groups"][i] if key == "fp32" else o["optimizer_state_dict"]["state"][i][key]
                out.append(flat[lo - self.starts[i]:hi - self.starts[i]])
        return out

    def get(self, name: str, key: str) -> torch.Tensor:
        off, pn, shape = self.where[name]
        n = _numel(shape)
        out, pos = torch.empty(n, dtype=torch.float32), 0
        for d in range(len(self.files)):                   # slice d covers [d*pn, (d+1)*pn), the last one padded
            for t in self._range(d, off, off + pn, key):
                k = min(t.numel(), n - pos)
                if k > 0:
                    out[pos:pos + k] = t[:k]
                pos += t.numel()
        return out.view(shape)


class _Whole:
    """Whole tensors by name from safetensors (or weights_only .bin) files: layout-free checkpoints and
    Hugging Face folders. index: our parameter name -> (file, key in that file)."""

    def __init__(self, index: dict[str, tuple[str, str]], optim_file: str | None = None):
        self.index, self._files = index, {}
        self.o = self._open(optim_file) if optim_file and os.path.isfile(optim_file) else None
        self._step = int(self.o.metadata()["step"]) if self.o is not None else None

    def _open(self, path: str):
        if path not in self._files:
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                try:
                    self._files[path] = safe_open(path, framework="pt")
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None
            else:
                self._files[path] = load_pt(path)
        return self._files[path]

    def _tensor(self, path: str, key: str) -> torch.Tensor:
        f = self._open(path)
        return f[key] if isinstance(f, dict) else f.get_tensor(key)

    def shapes(self) -> dict:
        out = {}
        for name, (path, key) in self.index.items():
            f = self._open(path)
            out[name] = tuple(f[key].shape) if isinstance(f, dict) else tuple(f.get_slice(key).get_shape())
        return out

    def has_optimizer(self) -> bool:
        return self.o is not None

    def step(self) -> int | None:
        return self._step

    def get(self, name: str, key: str) -> torch.Tensor:
        if key == "fp32":
            return self._tensor(*self.index[name]).float()
        return self.o.get_tensor(f"{key}/{name}")


# ----------------------------------------------------------------------------- the reader

class CheckpointReader:
    """Whole tensors of one checkpoint: reader.get(name, "fp32" | "exp_avg" | "exp_avg_sq")."""

    def __init__(self, tag_dir: str, state: dict | None = None):
        self.tag_dir = tag_dir
        self.state = state if state is not None else read_state(tag_dir)
        self.cfg = config_from_dict(self.state["config"])
        self.format = self.state["format"]
        lay = self.state.get("layout") or {}
        self.tp = int(lay.get("tp", 1))
        self.dp = int(lay.get("dp", 1))
        self.zero_stage = int(lay.get("zero_stage", 0))
        self._sources: dict[int, object] = {}
        self._dims = None
        self.shapes = model_shapes(self.cfg.model)           # the unsharded model's names, in order
        got = self._source(0).shapes()
        if self.tp == 1 and set(got) != set(self.shapes):
            extra, missing = sorted(set(got) - set(self.shapes)), sorted(set(self.shapes) - set(got))
            raise CheckpointError(f"checkpoint {tag_dir} does not hold the parameters of its model config "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")

    def _source(self, r: int):
        if r not in self._sources:
            if self.format == "deepspeed":
                if self.zero_stage == 0:
                    self._sources[r] = _Zero0(self.tag_dir, r, self.state.get("optimizer_param_names"))
                elif self.zero_stage in (1, 2):
                    self._sources[r] = _Zero12(self.tag_dir, r, self.dp)
                else:
                    self._sources[r] = _Zero3(self.tag_dir, r, self.dp)
            elif self.format == "layout-free":
                f = os.path.join(self.tag_dir, "model.safetensors")
                self._sources[r] = _Whole({n: (f, n) for n in self.shapes},
                                          os.path.join(self.tag_dir, "optimizer.safetensors"))
            elif self.format == "hf":
                self._sources[r] = _Whole({n: tuple(v) for n, v in self.state["weights"].items()})
            else:
                raise CheckpointError(f"checkpoint {self.tag_dir}: unknown format {self.format!r}")
        return self._sources[r]

    def names(self) -> list[str]:
        return list(self.shapes)

    def has_optimizer(self) -> bool:
        return self._source(0).has_optimizer()

    def optimizer_step(self) -> int | None:
        return self._source(0).step()

    def tp_dims(self) -> dict:
        if self._dims is None:
            if self.tp == 1:
                self._dims = {}
            else:
                self._dims = shard_dims(meta_model(self.cfg.model))
        return self._dims

    def get(self, name: str, key: str = "fp32") -> torch.Tensor:
        """The whole fp32 tensor `key` of parameter `name` (a fresh CPU tensor)."""
        if name not in self.shapes:
            raise CheckpointError(f"checkpoint {self.tag_dir} has no parameter '{name}'")
        try:
            if self.tp == 1:
                t = self._source(0).get(name, key)
            elif name in self.tp_dims():
                t = torch.cat([self._source(r).get(name, key) for r in range(self.tp)], dim=self.tp_dims()[name])
            else:
                t = self._source(0).get(name, key)
        except KeyError as e:
            raise CheckpointError(f"checkpoint {self.tag_dir}: no {key} for parameter '{name}' ({e})") from None
        if tuple(t.shape) != self.shapes[name]:
            raise CheckpointError(f"checkpoint {self.tag_dir}: parameter '{name}' has shape {tuple(t.shape)}, "
                                  f"its model config says {self.shapes[name]}")
        return t.float().contiguous()


def meta_model(mc):
    """The unsharded model on the meta device (shapes only, no memory, no initialisation)."""
    return build(mc, "meta")


def model_shapes(mc) -> dict[str, tuple]:
    """Parameter name -> shape of the unsharded model, in module order."""
    return {n: tuple(p.shape) for n, p in meta_model(mc).named_parameters()}
