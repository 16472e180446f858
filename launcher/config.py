"""The one source of truth for a run's settings.

Typed dataclasses, loaded from a YAML file in configs/, with dotted command-line overrides
(`optim.lr=3e-4`), validated before any process group or file is touched. Every error names
the key (and the file) it is about and is raised as ConfigError, which the CLI prints as one line.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from common.atomic import atomic_file
from common.errors import UserError
from data.config import DataConfig, check_data_config
from model import ARCHS, ModelConfig, arch_of, get as get_arch, make_config


class ConfigError(UserError):
    """A bad config value; the message names the key."""


@dataclass
class OptimConfig:
    lr: float = 7e-4
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    schedule: str = "inverse_sqrt"  # inverse_sqrt | cosine | constant
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.0       # cosine floor, as a fraction of lr
    grad_clip: float = 1.0          # 0 disables


@dataclass
class ParallelConfig:
    tp: int = 1                     # tensor-parallel degree (ranks inside a node)
    zero_stage: int = 2
    zero_at_one_rank: bool = False  # with one data-parallel rank run zero_stage anyway (default: ZeRO 0, faster, less memory)
    activation_checkpointing: bool = False


@dataclass
class CommConfig:
    """DeepSpeed's communication settings (sizes in elements). Buckets never exceed the rank's
    parameter count (a larger bucket only reserves memory), see launcher/training/engine.py ds_config."""
    overlap_comm: bool = True                   # ZeRO 1-3: reduce/gather in backward while computing
    contiguous_gradients: bool = True           # ZeRO 1-2: copy grads into one buffer (no fragmentation)
    reduce_bucket_size: int = 200_000_000       # ZeRO 1-3: elements per gradient reduce(-scatter)
    allgather_bucket_size: int = 200_000_000    # ZeRO 1-2: elements per parameter all-gather after the step
    stage3_prefetch_bucket_size: int = 50_000_000       # ZeRO 3: elements fetched ahead of use
    stage3_param_persistence_threshold: int = 100_000   # ZeRO 3: smaller parameters stay whole (no gather)
    stage3_max_live_parameters: int = 1_000_000_000     # ZeRO 3: gathered elements held at once


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 64     # samples per optimizer step, all ranks together
    micro_batch_size: int = 32      # samples per forward on one data-parallel rank
    precision: str = "bf16"         # fp32 | bf16
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0             # 0 = only at the end (if valid data is set)
    eval_generate: int = 256        # pairs: the first N validation examples decoded and scored (BLEU/chrF) at
                                    # each evaluation; `encdec eval` scores the same N by default; 0 = none
    label_smoothing: float = 0.0
    collective_timeout_s: int = 600  # a dead rank ends the job instead of hanging it
    compile: bool = False           # torch.compile (what, by layout: launcher/training/engine.compile_scope); any tp
    max_bad_steps: int = 20         # consecutive skipped (non-finite / spiking) steps before the run stops; 0 = never
    spike_z: float = 0.0            # skip a step whose loss is this many std above the recent mean; 0 = off
    spike_window: int = 100         # steps in that rolling mean / std
    hang_timeout_s: float = 300.0   # a rank with no progress this long ends the job (naming rank, step, phase); 0 = off


@dataclass
class CheckpointConfig:
    every: int = 500                # steps; 0 = only at the end
    keep: int = 3                   # newest checkpoints kept
    resume: str = "auto"            # auto (latest in run dir) | never | a checkpoint path


@dataclass
class WandbConfig:
    mode: str = "disabled"          # online | offline | disabled (WANDB_MODE wins)
    project: str = "encdec"
    entity: str = ""
    name: str = ""
    group: str = ""
    tags: list = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"       # run folder: config, metrics, checkpoints, wandb id
    model: ModelConfig = field(default_factory=make_config)    # model.arch's config class (default transformer)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ----------------------------------------------------------------------------- loading

def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Converts a YAML/CLI value to the dataclass field type, or raises naming the key."""
    origin = typing.get_origin(typ) or typ
    try:
        if typ is bool or origin is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if origin is float:
            return float(value)
        if origin is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return "" if value is None else str(value)
        args = typing.get_args(typ)
        if origin is list and args and dataclasses.is_dataclass(args[0]):     # a list of typed entries
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return [v if isinstance(v, args[0]) else _build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value)]
        if origin in (tuple, list):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return origin(value) if origin is list else tuple(float(v) for v in value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {getattr(origin, '__name__', origin)}")
    return value


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {raw!r}")
    if cls is ModelConfig:                   # the settings of model.arch: its own config class
        name = raw.get("arch", "transformer") if isinstance(raw, dict) else "transformer"
        if name not in ARCHS:
            raise ConfigError(f"config key '{prefix}arch': must be one of {', '.join(ARCHS)}, got {name!r}")
        cls = get_arch(name).config
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            arch = f" of model.arch={raw.get('arch', 'transformer')}" if issubclass(cls, ModelConfig) else ""
            raise ConfigError(f"unknown config key '{prefix}{k}'{arch} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], typ, prefix + f.name)
    return cls(**kwargs)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """YAML file + dotted overrides -> validated RunConfig."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: invalid YAML ({str(e).splitlines()[0]})")
    for item in overrides:
        _apply_override(raw, item)
    try:
        cfg = _build(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    d = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x
    return fix(d)


# Settings every model config held before each architecture got its own class (a checkpoint or run
# folder of an older version): dropped when they hold the value that meant "unused".
_LEGACY_MODEL_KEYS = {"head_dim": 0, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                      "tie_embeddings": False, "norm": "pre", "activation": "relu", "attention_dropout": 0.0}


def _migrate(d: dict) -> dict:
    m = d.get("model")
    if not isinstance(m, dict):
        return d
    try:
        names = {f.name for f in dataclasses.fields(get_arch(str(m.get("arch", "transformer"))).config)}
    except ValueError:
        return d
    m = {k: v for k, v in m.items() if k in names or _LEGACY_MODEL_KEYS.get(k, object()) != v}
    return {**d, "model": m}


def model_config_from_dict(m: dict) -> ModelConfig:
    """A saved model section -> its config class (the shared checks only; no run-level validation)."""
    return _build(ModelConfig, _migrate({"model": m})["model"], "model.")


def data_config(raw: dict) -> DataConfig:
    """A `data:` section (e.g. of an exported folder's config) -> a checked DataConfig, the config's defaults
    for what it leaves out."""
    d = _build(DataConfig, raw or {}, "data.")
    for key, msg in check_data_config(d):
        _check(False, key, msg)
    return d


def config_from_dict(d: dict) -> RunConfig:
    """A saved effective config (run folder, checkpoint, exported folder) -> validated RunConfig."""
    cfg = _build(RunConfig, _migrate(d), "")
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str) -> None:
    """Writes the effective config as YAML, atomically."""
    with atomic_file(path) as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: RunConfig) -> None:
    """Checks each value and the values that must agree with each other. The parallel layout
    (which needs the world size) is checked once per start by launcher.parallel.dims.validate_layout."""
    m, t, d, o, p = cfg.model, cfg.train, cfg.data, cfg.optim, cfg.parallel
    for key, msg in m.check():                              # the shared settings and the architecture's own
        _check(False, key, msg)
    for key, msg in check_data_config(d):                    # the data section (data/config.py)
        _check(False, key, msg)
    _check(not d.pack_attention or arch_of(m).document_attention, "data.pack_attention",
           f"document-aware attention is not built for model.arch={m.arch} "
           f"({arch_of(m).meta.get('document_attention', 'no per-document masks')})")
    _check(max(d.max_src_len, d.max_tgt_len) <= m.max_positions, "data.max_src_len",
           f"lengths {d.max_src_len}/{d.max_tgt_len} exceed model.max_positions={m.max_positions}")
    _check(t.precision in ("fp32", "bf16"), "train.precision", f"must be fp32 or bf16, got {t.precision!r}")
    _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.eval_generate >= 0, "train.eval_generate", f"must be >= 0 (0 = none), got {t.eval_generate}")
    _check(t.max_bad_steps >= 0, "train.max_bad_steps", f"must be >= 0, got {t.max_bad_steps}")
    _check(t.spike_z >= 0, "train.spike_z", f"must be >= 0 (0 = off), got {t.spike_z}")
    _check(t.spike_window >= 2, "train.spike_window", f"must be >= 2, got {t.spike_window}")
    _check(t.hang_timeout_s >= 0, "train.hang_timeout_s", f"must be >= 0 (0 = off), got {t.hang_timeout_s}")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}")
    _check(o.schedule in ("inverse_sqrt", "cosine", "constant"), "optim.schedule",
           f"must be inverse_sqrt, cosine or constant, got {o.schedule!r}")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(len(o.betas) == 2, "optim.betas", f"needs two values, got {o.betas}")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0-3, got {p.zero_stage}")
    _check(p.tp >= 1, "parallel.tp", f"must be >= 1, got {p.tp}")
    for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold", "stage3_max_live_parameters"):
        v = getattr(cfg.comm, k)
        _check(v > 0 if "bucket" in k else v >= 0, f"comm.{k}", f"must be {'> 0' if 'bucket' in k else '>= 0'}, got {v}")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.wandb.mode in ("online", "offline", "disabled"), "wandb.mode",
           f"must be online, offline or disabled, got {cfg.wandb.mode!r}")
