"""Saving and resuming training checkpoints: complete, atomic, verified, resumable on any layout.

Layout under RUN_DIR/checkpoints/:
    latest                  the tag to resume from; moved (atomically) only after every rank wrote
    step00000100/           one complete checkpoint:
        DeepSpeed's files   model + optimizer + LR scheduler, per ZeRO/TP rank (launcher/ckpt_reader.py)
        rng-rank0000.pt ... the RNG states (python, numpy, torch, cuda) of every rank
        tokenizer.json      the tokenizer the run trains with
        trainer_state.json  step, tokens seen, data-stream state, effective config, layout, scheduler,
                            and the size + sha256 of every file above; written last
    step00000100.partial/   a save in progress (or killed): never resumed from, removed by the next save

A save writes into TAG.partial/, every rank fsyncs its files, rank 0 writes trainer_state.json,
renames TAG.partial -> TAG, then moves `latest`, then prunes to the newest checkpoint.keep tags.
A save killed at any point leaves `latest` on the previous complete checkpoint.

Resume: on the layout the checkpoint was written with (world size, tp, ZeRO stage), DeepSpeed's
own loader restores everything and training continues bitwise as if never stopped. On any other
layout, launcher/reshard.py loads the whole tensors (weights and Adam state) into the new engine
(ENCDEC_RESHARD=always forces that path on the same layout too; the tests use it). Every file is
checked against its recorded size and sha256 first, and every file is loaded with weights_only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from launcher.ckpt_reader import STATE_FILE, CheckpointError, CheckpointReader, load_pt, read_state
from launcher.config import config_to_dict

__all__ = ["CheckpointError", "save", "maybe_resume", "resolve_resume", "read_latest", "LATEST"]

LATEST = "latest"
PARTIAL = ".partial"
# model settings that must agree between a checkpoint and the run resuming it (dropout may change)
ARCH_KEYS = ("real_vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers",
             "n_decoder_layers", "norm", "activation", "max_positions", "layer_norm_eps", "pad_id", "eos_id",
             "decoder_start_id")


def ckpt_root(cfg) -> str:
    return os.path.join(cfg.out_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(root, tag)):
        raise CheckpointError(f"{path} points to {tag!r}, which does not exist")
    return tag


# ----------------------------------------------------------------------------- fault injection (tests)

def _maybe_kill(point: str, rank: int, tag: str) -> None:
    """ENCDEC_CKPT_KILL=rank:point:tag sends SIGKILL to that rank at that point of that save (kill -9
    tests). Points: ds-file (after each DeepSpeed file), files-written, before-rename, before-latest."""
    spec = os.environ.get("ENCDEC_CKPT_KILL")
    if spec:
        r, p, t = spec.split(":", 2)
        if int(r) == rank and p == point and t == tag:
            print(f"ENCDEC_CKPT_KILL: rank {rank} killed at '{point}'", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- DeepSpeed file I/O

def _install_io(engine, rank: int):
    """Routes DeepSpeed's checkpoint I/O through _SafeIO (fsync, file list, weights_only loads)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    ce = getattr(engine, "checkpoint_engine", None)
    if isinstance(ce, _safe_io_class()):
        return ce
    if type(ce) is not TorchCheckpointEngine:          # a custom (async, NVMe) engine: leave it alone
        return None
    engine.checkpoint_engine = _safe_io_class()(engine._config, rank)
    return engine.checkpoint_engine


_SAFE_IO = None


def _safe_io_class():
    global _SAFE_IO                                     # a class defined once, lazily (imports deepspeed)
    if _SAFE_IO is None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        class _SafeIO(TorchCheckpointEngine):
            """torch.save in the zip format (mmap-able), fsynced, remembered; loads with weights_only."""

            def __init__(self, config_params, rank):
                super().__init__(config_params)
                self.zipfile_serialization = True
                self.rank, self.written = rank, []

            def save(self, state_dict, path: str):
                tmp = f"{path}.tmp"
                torch.save(state_dict, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                self.written.append(path)
                _maybe_kill("ds-file", self.rank, os.path.basename(os.path.dirname(path)).removesuffix(PARTIAL))

            def load(self, path: str, map_location=None):
                return load_pt(path, mmap=False, map_location=map_location or "cpu")
        _SAFE_IO = _SafeIO
    return _SAFE_IO


# ----------------------------------------------------------------------------- RNG

def _rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- save

def layout_of(trainer) -> dict:
    return {"world_size": trainer.env.world_size, "tp": trainer.cfg.parallel.tp, "dp": trainer.dp,
            "zero_stage": trainer.cfg.parallel.zero_stage}


def _optimizer_param_names(trainer) -> list[list[str]] | None:
    """ZeRO 0: parameter names per torch param group (its state dict keys parameters by position)."""
    if trainer.cfg.parallel.zero_stage != 0:
        return None
    ids = {id(p): n for n, p in trainer.engine.module.named_parameters()}
    return [[ids[id(p)] for p in g["params"]] for g in trainer.engine.optimizer.param_groups]


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save(trainer) -> str:
    cfg, root, tag, rank = trainer.cfg, ckpt_root(trainer.cfg), tag_for(trainer.step), trainer.env.rank
    part_tag = tag + PARTIAL
    part_dir, final_dir = os.path.join(root, part_tag), os.path.join(root, tag)
    if trainer.is_rank0:
        os.makedirs(root, exist_ok=True)
        for t in os.listdir(root):                      # leftovers of killed saves
            if t.endswith(PARTIAL):
                shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    dist.barrier()
    io = _install_io(trainer.engine, rank)
    if io is not None:
        io.written = []
    trainer.engine.save_checkpoint(root, tag=part_tag, save_latest=False)
    written = list(io.written) if io is not None else []
    rng_path = os.path.join(part_dir, f"rng-rank{rank:04d}.pt")
    torch.save(_rng_state(), rng_path)
    with open(rng_path, "rb+") as f:
        os.fsync(f.fileno())
    written.append(rng_path)
    if io is None:                                     # a custom engine: list what is there
        written = [os.path.join(part_dir, f) for f in os.listdir(part_dir)]
    files = {os.path.relpath(p, part_dir): file_digest(p) for p in written}
    _maybe_kill("files-written", rank, tag)
    all_files = {}
    for d in _gather(files):
        all_files.update(d)
    if trainer.is_rank0:
        tok = os.path.join(part_dir, "tokenizer.json")
        shutil.copyfile(trainer.tokenizer_path, tok)
        all_files["tokenizer.json"] = file_digest(tok)
        state = {"format": "deepspeed", "format_version": 1, "step": trainer.step,
                 "tokens_seen": trainer.tokens_seen, "data": trainer.stream.state_dict(),
                 "layout": layout_of(trainer), "config": config_to_dict(cfg),
                 "scheduler": _jsonable(trainer.scheduler.state_dict()) if trainer.scheduler else None,
                 "optimizer_param_names": _optimizer_param_names(trainer), "files": all_files}
        _atomic_write(os.path.join(part_dir, STATE_FILE), json.dumps(state, indent=1))
        _maybe_kill("before-rename", rank, tag)
        if os.path.isdir(final_dir):                    # a re-save of this step (after a rollback)
            shutil.rmtree(final_dir)
        os.rename(part_dir, final_dir)
        _fsync_dir(root)
        _maybe_kill("before-latest", rank, tag)
        _atomic_write(os.path.join(root, LATEST), tag)
        _prune(root, cfg.checkpoint.keep, keep_tag=tag)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):   # DeepSpeed's recovery scripts: `encdec convert`
            for d in (root, final_dir):
                if os.path.isfile(os.path.join(d, script)):
                    os.remove(os.path.join(d, script))
    dist.barrier()
    return final_dir


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    return x if isinstance(x, (int, float, str, bool)) or x is None else str(x)


def _prune(root: str, keep: int, keep_tag: str) -> None:
    """Keeps the newest `keep` complete checkpoints (and always keep_tag, the one `latest` names)."""
    tags = sorted(t for t in os.listdir(root) if t.startswith("step") and not t.endswith(PARTIAL)
                  and os.path.isfile(os.path.join(root, t, STATE_FILE)))
    for t in tags[:-keep]:
        if t != keep_tag:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


# ----------------------------------------------------------------------------- resume

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
    if os.path.isfile(os.path.join(path, LATEST)):
        return path, read_latest(path)
    return os.path.dirname(path), os.path.basename(path)


def check_compatible(saved_cfg: dict, mc, where: str) -> None:
    """Raises naming every model setting that differs between the checkpoint and this run."""
    saved = saved_cfg.get("model", {})
    diff = [f"model.{k}={saved.get(k)!r} in the checkpoint, {getattr(mc, k)!r} in this run"
            for k in ARCH_KEYS if k in saved and saved[k] != getattr(mc, k)]
    # the padded vocabulary may differ (another tp or vocab_multiple): rows past the real vocabulary are padding
    v_saved, real = saved.get("vocab_size"), saved.get("real_vocab_size") or saved.get("vocab_size")
    if v_saved is not None and v_saved != mc.vocab_size and (real is None or min(v_saved, mc.vocab_size) < real):
        diff.append(f"model.vocab_size={v_saved!r} in the checkpoint, {mc.vocab_size!r} in this run")
    if diff:
        raise CheckpointError(f"checkpoint {where} is from another model config: " + "; ".join(diff))


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


def _all_ok(err: str | None) -> None:
    """Collective: raises on every rank if any rank found a problem (naming the first)."""
    errs = [e for e in _gather(err) if e]
    if errs:
        raise CheckpointError(errs[0])


def maybe_resume(trainer) -> None:
    found = resolve_resume(trainer.cfg)
    if not found:
        return
    root, tag = found
    tag_dir = os.path.join(root, tag)
    rank, world = trainer.env.rank, trainer.env.world_size
    err, state = None, None
    try:
        if _is_hf_folder(tag_dir):
            from launcher.hf_import import hf_state
            state = hf_state(tag_dir)
        else:
            state = read_state(tag_dir)
            verify_files(tag_dir, state, rank, world)
        check_compatible(state["config"], trainer.cfg.model, tag_dir)
        _check_tokenizer(tag_dir, state, trainer.tokenizer_path)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait in _all_ok
        err = f"checkpoint {tag_dir}: {type(e).__name__}: {e}"
    _all_ok(err)
    same = (state["format"] == "deepspeed" and state.get("layout") == layout_of(trainer)
            and state["config"]["model"].get("vocab_size") == trainer.cfg.model.vocab_size
            and os.environ.get("ENCDEC_RESHARD") != "always")     # the switch the tests use to force resharding
    if same:
        _install_io(trainer.engine, rank)
        path, _ = trainer.engine.load_checkpoint(root, tag=tag, load_module_strict=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng = os.path.join(tag_dir, f"rng-rank{rank:04d}.pt")
        _set_rng_state(load_pt(rng, mmap=False))
    else:
        from launcher.reshard import load_into_engine
        load_into_engine(trainer, CheckpointReader(tag_dir, state))
        # another layout: the old ranks' generators do not map onto the new ones; seed each rank anew
        _seed_all(trainer.cfg.train.seed * 1_000_003 + int(state["step"]) * 1009 + rank)
    trainer.step, trainer.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
    if state.get("data"):
        trainer.stream.load_state_dict(state["data"])
    if trainer.is_rank0:
        how = "same layout" if same else f"resharded from {state.get('layout') or state['format']}"
        print(f"resumed from {tag_dir} at step {trainer.step} ({how})", flush=True)


def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, STATE_FILE))


def _check_tokenizer(tag_dir: str, state: dict, run_tok: str) -> None:
    """The checkpoint's tokenizer must map the same tokens to the same ids as the run's."""
    tok = os.path.join(tag_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        tok = os.path.join(os.path.dirname(tag_dir), "tokenizer.json")     # older layout: one per root
    if not os.path.isfile(tok):
        return
    if file_digest(tok)["sha256"] == file_digest(run_tok)["sha256"]:
        return
    from tokenizers import Tokenizer
    try:
        same = Tokenizer.from_file(tok).get_vocab() == Tokenizer.from_file(run_tok).get_vocab()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read tokenizer {tok}: {e}") from None
    if not same:
        raise CheckpointError(f"checkpoint {tag_dir} was trained with another tokenizer than {run_tok} "
                              f"(the vocabularies differ)")
