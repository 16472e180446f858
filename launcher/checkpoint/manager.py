"""Saving and resuming training checkpoints: complete, atomic, verified, resumable on any layout.

A CheckpointManager saves and restores the trainer's named parts:
    engine     DeepSpeed's files (model, optimizer, LR scheduler)   per ZeRO/TP rank
    scheduler  also in trainer_state.json (read when resharding)
    data       the stream's position {"epoch", "cursor"} and       trainer_state.json "data"
               counters' totals {"counters"} (a collective)
    train      step, tokens seen                                    trainer_state.json top level
plus every rank's RNG (rng-rankNNNN.pt), the effective config, the layout and the tokenizer
(the on-disk format: format.py).

A save writes into TAG.partial/, every rank fsyncs its files, rank 0 writes trainer_state.json,
renames TAG.partial -> TAG, then moves `latest`, then prunes to the newest checkpoint.keep tags.
A save killed at any point leaves `latest` on the previous complete checkpoint.

Resume: on the layout the checkpoint was written with (world size, tp, ZeRO stage), DeepSpeed's
own loader restores everything and training continues bitwise as if never stopped. On any other
layout, reshard.py loads the whole tensors (weights and Adam state) into the new engine
(the tests force that path on the same layout too: launcher/faults.py). Every file is
checked against its recorded size and sha256 first, and every file is loaded with weights_only.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from tokenizers import Tokenizer

from common.atomic import atomic_path, atomic_write, file_digest, fsync_dir
from launcher.checkpoint.format import (LATEST, PARTIAL, ROLLBACK, STATE_FILE, CheckpointError, check_compatible,
                                        ckpt_root, is_hf_folder, load_pt, read_latest, read_state, resolve_resume,
                                        tag_for, verify_files)
from launcher.checkpoint.hf_folder import hf_state
from launcher.checkpoint.reader import CheckpointReader
from launcher.checkpoint.reshard import load_into_engine
from launcher.checkpoint.rng import rng_state, seed_all, set_rng_state
from launcher.config import config_to_dict
from launcher.faults import NONE, Faults
from launcher.parallel.dims import Mesh


class _SafeIO(TorchCheckpointEngine):
    """DeepSpeed's checkpoint I/O: torch.save in the zip format (mmap-able), fsynced, remembered;
    loads with weights_only."""

    def __init__(self, config_params, rank, faults: Faults = NONE):
        super().__init__(config_params)
        self.zipfile_serialization = True
        self.rank, self.written, self.faults = rank, [], faults

    def save(self, state_dict, path: str):
        with atomic_path(path) as tmp:
            torch.save(state_dict, tmp)
        self.written.append(path)
        self.faults.at_checkpoint("ds-file", self.rank, os.path.basename(os.path.dirname(path)).removesuffix(PARTIAL))

    def load(self, path: str, map_location=None):
        return load_pt(path, mmap=False, map_location=map_location or "cpu")


def _install_io(engine, rank: int, faults: Faults = NONE) -> _SafeIO | None:
    ce = getattr(engine, "checkpoint_engine", None)
    if isinstance(ce, _SafeIO):
        return ce
    if type(ce) is not TorchCheckpointEngine:          # a custom (async, NVMe) engine: leave it alone
        return None
    engine.checkpoint_engine = _SafeIO(engine._config, rank, faults)
    return engine.checkpoint_engine


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_ok(err: str | None) -> None:
    """Collective: raises on every rank if any rank found a problem (naming the first)."""
    errs = [e for e in _gather(err) if e]
    if errs:
        raise CheckpointError(errs[0])


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


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two folders (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0


def _move_into_place(part_dir: str, final_dir: str) -> None:
    """part_dir -> final_dir. A re-save of an existing step (after a rollback) swaps the two folders
    in one step, so the folder `latest` may name exists at every instant; the old one is removed after."""
    if not os.path.isdir(final_dir):
        os.rename(part_dir, final_dir)
        return
    if _exchange(part_dir, final_dir):
        shutil.rmtree(part_dir)                         # now the old content
        return
    old = final_dir + ".replaced"                       # no RENAME_EXCHANGE: a short window, latest moved first
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final_dir, old)
    os.rename(part_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def _params_finite(engine) -> bool:
    """This rank's share of the parameters (ZeRO-3: its partition) holds only finite values."""
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


def _check_tokenizer(tag_dir: str, run_tok: str) -> None:
    """The checkpoint's tokenizer must map the same tokens to the same ids as the run's."""
    tok = os.path.join(tag_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        tok = os.path.join(os.path.dirname(tag_dir), "tokenizer.json")     # older layout: one per root
    if not os.path.isfile(tok):
        return
    if file_digest(tok)["sha256"] == file_digest(run_tok)["sha256"]:
        return
    try:
        same = Tokenizer.from_file(tok).get_vocab() == Tokenizer.from_file(run_tok).get_vocab()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read tokenizer {tok}: {e}") from None
    if not same:
        raise CheckpointError(f"checkpoint {tag_dir} was trained with another tokenizer than {run_tok} "
                              f"(the vocabularies differ)")


class CheckpointManager:
    """Saves and resumes one run's checkpoints (RUN_DIR/checkpoints) for one rank."""

    def __init__(self, cfg, env, mesh: Mesh, tokenizer_path: str, faults: Faults = NONE):
        self.cfg, self.rank, self.world, self.faults = cfg, env.rank, env.world_size, faults
        self.mesh, self.tokenizer_path = mesh, tokenizer_path
        self.root = ckpt_root(cfg)
        self.layout = {"world_size": env.world_size, "tp": cfg.parallel.tp, "dp": mesh.dp,
                       "zero_stage": cfg.parallel.zero_stage}

    def _optimizer_param_names(self, engine) -> list[list[str]] | None:
        """ZeRO 0: parameter names per torch param group (its state dict keys parameters by position)."""
        if self.cfg.parallel.zero_stage != 0:
            return None
        ids = {id(p): n for n, p in engine.module.named_parameters()}
        return [[ids[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]

    # ------------------------------------------------------------------ save
    def save(self, engine, scheduler, data, train) -> str:
        """Collective: writes checkpoint step<train.step>; returns its folder."""
        step = train.state_dict()["step"]
        data_state = data.state_dict()                      # collective: the data counters' totals
        # never a checkpoint from non-finite state: `latest` (and what `keep` keeps) stays good
        _all_ok(None if _params_finite(engine) else
                f"refusing to save checkpoint step {step}: rank {self.rank} has non-finite parameters")
        prev = read_latest(self.root) if os.path.isfile(os.path.join(self.root, LATEST)) else None

        def failed(e: Exception) -> str:                    # disk full, quota, I/O error: on any rank
            why = (getattr(e, "strerror", None) or str(e).strip().splitlines()[0] if str(e).strip()
                   else type(e).__name__)
            try:
                st = os.statvfs(self.root)
                free = st.f_bavail * st.f_frsize
                if free < 16 << 20:
                    why += f"; No space left on device? {free // 1024} KiB free"
            except OSError:
                pass
            return (f"saving checkpoint step {step} failed on rank {self.rank}: {why} "
                    f"({getattr(e, 'filename', None) or self.root}); the previous checkpoint {prev or '(none)'} "
                    "is intact")
        root, rank = self.root, self.rank
        tag = tag_for(step)
        part_tag = tag + PARTIAL
        part_dir, final_dir = os.path.join(root, part_tag), os.path.join(root, tag)
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            for t in os.listdir(root):                      # leftovers of killed saves
                if t.endswith(PARTIAL) or t.endswith(".replaced"):
                    shutil.rmtree(os.path.join(root, t), ignore_errors=True)
        dist.barrier()
        files, err = None, None
        try:
            files = self._write_rank_files(engine, part_tag, part_dir)
        except (OSError, RuntimeError) as e:                # torch.save reports a failed write as RuntimeError
            err = failed(e)
        self.faults.at_checkpoint("files-written", rank, tag)
        gathered = _gather((files, err))
        errs = [e for _, e in gathered if e]
        if errs:
            if rank == 0:
                shutil.rmtree(part_dir, ignore_errors=True)
            raise CheckpointError(errs[0])
        all_files = {}
        for d, _ in gathered:
            all_files.update(d)
        err = None
        if rank == 0:
            try:
                self._publish(engine, scheduler, data_state, train, tag, part_dir, final_dir, all_files)
            except (OSError, RuntimeError) as e:
                shutil.rmtree(part_dir, ignore_errors=True)
                err = failed(e)
        _all_ok(err)
        dist.barrier()
        return final_dir

    def _write_rank_files(self, engine, part_tag: str, part_dir: str) -> dict:
        """This rank's DeepSpeed files and RNG state in TAG.partial/, fsynced -> {relative path: size, sha256}."""
        io = _install_io(engine, self.rank, self.faults)
        if io is not None:
            io.written = []
        engine.save_checkpoint(self.root, tag=part_tag, save_latest=False)
        written = list(io.written) if io is not None else []
        rng_path = os.path.join(part_dir, f"rng-rank{self.rank:04d}.pt")
        with atomic_path(rng_path) as tmp:
            torch.save(rng_state(), tmp)
        written.append(rng_path)
        if io is None:                                     # a custom engine: list what is there
            written = [os.path.join(part_dir, f) for f in os.listdir(part_dir)]
        return {os.path.relpath(p, part_dir): file_digest(p) for p in written}

    def _publish(self, engine, scheduler, data_state, train, tag, part_dir, final_dir, all_files) -> None:
        """Rank 0: trainer_state.json, TAG.partial -> TAG, then `latest`, then pruning."""
        root, rank = self.root, self.rank
        tok = os.path.join(part_dir, "tokenizer.json")
        shutil.copyfile(self.tokenizer_path, tok)
        all_files["tokenizer.json"] = file_digest(tok)
        state = {"format": "deepspeed", "format_version": 1, **train.state_dict(), "data": data_state,
                 "layout": self.layout, "config": config_to_dict(self.cfg),
                 "scheduler": _jsonable(scheduler.state_dict()) if scheduler else None,
                 "optimizer_param_names": self._optimizer_param_names(engine), "files": all_files}
        atomic_write(os.path.join(part_dir, STATE_FILE), json.dumps(state, indent=1))
        self.faults.at_checkpoint("before-rename", rank, tag)
        _move_into_place(part_dir, final_dir)           # a re-save of this step (after a rollback) too
        fsync_dir(root)
        self.faults.at_checkpoint("before-latest", rank, tag)
        atomic_write(os.path.join(root, LATEST), tag)
        _prune(root, self.cfg.checkpoint.keep, keep_tag=tag)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):   # DeepSpeed's recovery scripts: `encdec convert`
            for d in (root, final_dir):
                if os.path.isfile(os.path.join(d, script)):
                    os.remove(os.path.join(d, script))

    # ------------------------------------------------------------------ resume
    def _read(self, tag_dir: str) -> dict:
        """The checkpoint's state, verified (files, model config, tokenizer) on every rank, or one error."""
        err, state = None, None
        try:
            if is_hf_folder(tag_dir):
                state = hf_state(tag_dir)
            else:
                state = read_state(tag_dir)
                verify_files(tag_dir, state, self.rank, self.world)
            check_compatible(state["config"], self.cfg.model, tag_dir)
            _check_tokenizer(tag_dir, self.tokenizer_path)
        except CheckpointError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait in _all_ok
            err = f"checkpoint {tag_dir}: {type(e).__name__}: {e}"
        _all_ok(err)
        return state

    def resume(self, engine, scheduler, data, train) -> str | None:
        """Collective: restores every part from checkpoint.resume; returns the folder, or None (fresh start)."""
        found = resolve_resume(self.cfg)
        if not found:
            return None
        root, tag = found
        tag_dir = os.path.join(root, tag)
        state = self._read(tag_dir)
        same = (state["format"] == "deepspeed" and state.get("layout") == self.layout
                and state["config"]["model"].get("vocab_size") == self.cfg.model.vocab_size
                and not self.faults.reshard_always)
        if same:
            _install_io(engine, self.rank, self.faults)
            path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=True)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
            set_rng_state(load_pt(os.path.join(tag_dir, f"rng-rank{self.rank:04d}.pt"), mmap=False))
        else:
            load_into_engine(engine, scheduler, CheckpointReader(tag_dir, state), self.cfg, self.mesh)
            # another layout: the old ranks' generators do not map onto the new ones; seed each rank anew
            seed_all(self.cfg.train.seed * 1_000_003 + int(state["step"]) * 1009 + self.rank)
        train.load_state_dict(state)
        if self.rank == 0 and os.path.abspath(root) == os.path.abspath(self.root) and self.cfg.checkpoint.resume not in (
                "auto", "never"):                       # a rollback to one of this run's tags: remember it
            atomic_write(os.path.join(self.root, ROLLBACK), json.dumps(
                {"resume": os.path.abspath(self.cfg.checkpoint.resume.rstrip("/")), "latest_then": read_latest(root)}))
        if state.get("data"):
            data.load_state_dict(state["data"])
        if self.rank == 0:
            how = "same layout" if same else f"resharded from {state.get('layout') or state['format']}"
            print(f"resumed from {tag_dir} at step {train.state_dict()['step']} ({how})", flush=True)
        return tag_dir
