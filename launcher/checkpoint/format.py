"""The on-disk checkpoint format: names, the state file, verification, safe loading.

Layout under RUN_DIR/checkpoints/:
    latest                  the tag to resume from; moved (atomically) only after every rank wrote
    step00000100/           one complete checkpoint:
        DeepSpeed's files   model + optimizer + LR scheduler, per ZeRO/TP rank (reader.py)
        rng-rank0000.pt ... the RNG states (python, numpy, torch, cuda) of every rank
        tokenizer.json      the tokenizer the run trains with
        trainer_state.json  step, tokens seen, data-stream state, effective config, layout, scheduler,
                            and the size + sha256 of every file above; written last
    step00000100.partial/   a save in progress (or killed): never resumed from, removed by the next save

trainer_state.json "format": deepspeed (the above), layout-free (model.safetensors [+
optimizer.safetensors], written by `encdec import`), or hf (a Hugging Face folder, in memory only).
"""
from __future__ import annotations

import json
import os

import torch

from common.atomic import file_digest
from common.errors import UserError
from launcher import run_files
from launcher.config import ConfigError, model_config_from_dict

STATE_FILE = "trainer_state.json"
LATEST = run_files.LATEST
PARTIAL = ".partial"


class CheckpointError(UserError):
    """A missing, incomplete, corrupt or incompatible checkpoint; the message names the file."""


def ckpt_root(cfg) -> str:
    return os.path.join(cfg.out_dir, run_files.CHECKPOINTS)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    if tag and not os.path.isdir(os.path.join(root, tag)):
        _finish_swap(root, tag)
    if not tag or not os.path.isdir(os.path.join(root, tag)):
        raise CheckpointError(f"{path} points to {tag!r}, which does not exist")
    return tag


def _finish_swap(root: str, tag: str) -> None:
    """A re-save of TAG on a filesystem without an atomic folder swap moves TAG to TAG.replaced,
    then TAG.partial to TAG. Killed in between, TAG is missing but its previous content is
    complete in TAG.replaced: put it back (another rank may have done so already)."""
    old = os.path.join(root, tag + ".replaced")
    if os.path.isfile(os.path.join(old, STATE_FILE)):
        try:
            os.rename(old, os.path.join(root, tag))
        except OSError:
            pass


def read_state(tag_dir: str) -> dict:
    p = os.path.join(tag_dir, STATE_FILE)
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: no {STATE_FILE}")
    try:
        with open(p, encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {p} is corrupt: {e}") from None
    for k in ("format", "step", "config"):
        if k not in st:
            raise CheckpointError(f"checkpoint file {p} is corrupt: key '{k}' missing")
    return upgrade_state(st)


def upgrade_state(st: dict) -> dict:
    """A state written by older code, in today's layout: the data counters (bad samples, packing
    stats) were the top-level "data_counters", they are now part of the stream's state "data"."""
    old = st.pop("data_counters", None)
    if old and isinstance(st.get("data"), dict) and "counters" not in st["data"]:
        st["data"] = {**st["data"], "counters": old}
    return st


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, STATE_FILE))


def verify_files(tag_dir: str, state: dict, rank: int = 0, world: int = 1, full: bool = True) -> None:
    """Every listed file exists with its size; with full, its sha256 too (files split over the ranks)."""
    files = state.get("files")
    if files is None:
        raise CheckpointError(f"checkpoint {tag_dir}: {STATE_FILE} lists no files (incomplete save?)")
    for i, (rel, meta) in enumerate(sorted(files.items())):
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: file {rel} is missing")
        if os.path.getsize(p) != meta["size"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: {os.path.getsize(p)} bytes, "
                                  f"{meta['size']} when saved")
        if full and i % world == rank and file_digest(p)["sha256"] != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: sha256 differs from when it was saved")


def check_compatible(saved_cfg: dict, mc, where: str) -> None:
    """Raises naming every model setting that differs between the checkpoint and this run (the
    settings of ModelConfig.identity: dropout and the padded vocabulary may change)."""
    try:
        saved_mc = model_config_from_dict(saved_cfg.get("model", {}))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {where}: its model config cannot be read ({e})") from None
    a, b = saved_mc.identity(), mc.identity()
    diff = [f"model.{k}={a.get(k)!r} in the checkpoint, {b.get(k)!r} in this run"
            for k in sorted(set(a) | set(b), key=lambda k: (k != "arch", k)) if a.get(k) != b.get(k)]
    # the padded vocabulary may differ (another tp or vocab_multiple): rows past the real vocabulary are padding
    v_saved, real = saved_mc.vocab_size, saved_mc.real_vocab_size or saved_mc.vocab_size
    if v_saved and v_saved != mc.vocab_size and min(v_saved, mc.vocab_size) < real:
        diff.append(f"model.vocab_size={v_saved!r} in the checkpoint, {mc.vocab_size!r} in this run")
    if diff:
        raise CheckpointError(f"checkpoint {where} is from another model config: " + "; ".join(diff))


def _safe_globals() -> list:
    """The few DeepSpeed classes its optimizer files pickle (beside tensors and plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_pt(path: str, mmap: bool = True, map_location="cpu"):
    """torch.load with weights_only=True (plus DeepSpeed's few plain classes); errors name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
        lines = [ln.strip() for ln in str(e).strip().splitlines()] or [type(e).__name__]
        if lines[0].startswith("Weights only load failed"):
            why = [ln for ln in lines if "GLOBAL" in ln] or lines[-1:]
            raise CheckpointError(f"refusing to load checkpoint file {path}: it pickles more than tensors and "
                                  f"plain data (weights_only load: {why[0].removeprefix('WeightsUnpickler error: ')})"
                                  ) from None
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(e).__name__}: {lines[0]}") from None


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """A run folder, a checkpoints folder (with `latest`) or one checkpoint tag folder -> (root, tag)."""
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    for root in (os.path.join(path, run_files.CHECKPOINTS), path):
        if os.path.isfile(os.path.join(root, LATEST)):
            return root, read_latest(root)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointError(f"not a checkpoint: {path} (no '{LATEST}' file or {STATE_FILE})")


def resolve_resume(cfg) -> tuple[str, str] | None:
    """-> (checkpoint root, tag) to resume from, or None to start fresh.

    checkpoint.resume: auto = this run's `latest`; never; or a path (a checkpoints folder with
    `latest`, a tag folder, or a Hugging Face model folder to start from). A path outside this
    run's folder only seeds a fresh run: once the run has a checkpoint of its own, it resumes
    from that one (so a requeued job does not start over).
    """
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    root = ckpt_root(cfg)
    own = read_latest(root) if os.path.isdir(root) else None
    if mode == "auto":
        return (root, own) if own else None
    path = os.path.abspath(mode.rstrip("/"))
    if not os.path.exists(path):
        raise CheckpointError(f"config key 'checkpoint.resume': checkpoint not found: {path}")
    if own and not path.startswith(os.path.abspath(root) + os.sep) and path != os.path.abspath(root):
        return root, own
    if own and rolled_back_since(root, path, own):      # a rollback that already ran: continue its own line
        return root, own
    if os.path.isfile(os.path.join(path, LATEST)):
        return path, read_latest(path)
    return os.path.dirname(path), os.path.basename(path)


ROLLBACK = "rollback.json"


def rolled_back_since(root: str, path: str, own: str) -> bool:
    """True when this run already resumed from `path` (a rollback to one of its own tags) and has
    saved since: a requeued job with the same checkpoint.resume continues from `latest` instead of
    going back again."""
    try:
        with open(os.path.join(root, ROLLBACK), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return False
    return rec.get("resume") == path and rec.get("latest_then") != own
