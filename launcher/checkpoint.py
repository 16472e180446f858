"""Saving and resuming training checkpoints (DeepSpeed engine state + the trainer's own state).

Layout under RUN_DIR/checkpoints/:
    latest                   the tag to resume from; moved (atomically) only after every rank wrote
    step00000100/            DeepSpeed's files (model + optimizer, per ZeRO/TP rank) and
        trainer_state.json   step, tokens seen, data-stream state, effective config
        rng-rank0000.pt ...  the RNG states of every rank
    tokenizer.json           the tokenizer the run trains with
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from launcher.config import config_to_dict

LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


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


def read_latest(root: str) -> str | None:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(root, tag)):
        raise CheckpointError(f"{path} points to {tag}, which does not exist")
    return tag


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save(trainer) -> str:
    cfg, root, tag = trainer.cfg, ckpt_root(trainer.cfg), tag_for(trainer.step)
    state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "data": trainer.stream.state_dict(),
             "config": config_to_dict(cfg)}
    trainer.engine.save_checkpoint(root, tag=tag, client_state={"trainer": state}, save_latest=False)
    tag_dir = os.path.join(root, tag)
    torch.save(_rng_state(), os.path.join(tag_dir, f"rng-rank{trainer.env.rank:04d}.pt"))
    if trainer.is_rank0:
        _atomic_write(os.path.join(tag_dir, "trainer_state.json"), json.dumps(state, indent=1))
        tok_dst = os.path.join(root, "tokenizer.json")
        if not os.path.exists(tok_dst):
            shutil.copyfile(trainer.tokenizer_path, tok_dst + ".tmp")
            os.replace(tok_dst + ".tmp", tok_dst)
    dist.barrier()                                  # every rank has written its files
    if trainer.is_rank0:
        _atomic_write(os.path.join(root, LATEST), tag)
        _prune(root, cfg.checkpoint.keep, keep_tag=tag)
    dist.barrier()
    return tag_dir


def _prune(root: str, keep: int, keep_tag: str) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))
    for t in tags[:-keep]:
        if t != keep_tag:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def resolve_resume(cfg) -> tuple[str, str] | None:
    """-> (checkpoint root, tag) to resume from, or None to start fresh."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        root = ckpt_root(cfg)
        tag = read_latest(root) if os.path.isdir(root) else None
        return (root, tag) if tag else None
    path = mode.rstrip("/")
    if not os.path.exists(path):
        raise CheckpointError(f"config key 'checkpoint.resume': checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, LATEST)):
        return path, read_latest(path)
    return os.path.dirname(path), os.path.basename(path)


def maybe_resume(trainer) -> None:
    found = resolve_resume(trainer.cfg)
    if not found:
        return
    root, tag = found
    path, client = trainer.engine.load_checkpoint(root, tag=tag, load_module_strict=True)
    if path is None or not client or "trainer" not in client:
        raise CheckpointError(f"could not load checkpoint {os.path.join(root, tag)}")
    st = client["trainer"]
    trainer.step, trainer.tokens_seen = int(st["step"]), int(st["tokens_seen"])
    trainer.stream.load_state_dict(st["data"])
    rng = os.path.join(root, tag, f"rng-rank{trainer.env.rank:04d}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    if trainer.is_rank0:
        print(f"resumed from {os.path.join(root, tag)} at step {trainer.step}", flush=True)
