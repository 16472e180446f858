"""The vocabulary rows of a run that continues from a checkpoint or a Hugging Face folder.

A run pads its tokenizer's vocabulary to a multiple of model.vocab_multiple and of the TP degree
(launcher/training/inputs.py). What it continues from may hold another row count: a T5 folder of
32128 rows for 32100 tokens, a folder of 1100 rows, a run trained at another TP degree. Those rows
are part of the function (T5's softmax runs over all of them), so the run keeps every one:

    vocab_size          padded up from the checkpoint's rows (never cut below them)
    export_vocab_size   the checkpoint's rows, where they differ from vocab_size: exports cut back
                        to them (launcher/hf/export.py); the rows past them are padding of ours,
                        zeros on load (reshard.py) and never predicted (the model masks them)

fit_run_vocab runs before the model is built (launcher/train.py; `encdec train --nproc N` runs it
before it starts the ranks too, so a folder it cannot read is refused in one line), so the config
saved with the run and in every checkpoint records export_vocab_size, and a run resumed from its
own checkpoint keeps it.
"""
from __future__ import annotations

import dataclasses
import math
import os

from launcher.checkpoint.format import is_hf_folder, read_state, resolve_resume
from launcher.checkpoint.hf_folder import hf_state
from launcher.config import ConfigError, RunConfig
from model import padded_vocab


def resume_rows(cfg: RunConfig) -> int:
    """Vocabulary rows of what checkpoint.resume continues from (its export rows); 0 = a fresh start."""
    found = resolve_resume(cfg)
    if not found:
        return 0
    tag_dir = os.path.join(*found)
    m = (hf_state(tag_dir) if is_hf_folder(tag_dir) else read_state(tag_dir))["config"].get("model") or {}
    return int(m.get("export_vocab_size") or m.get("vocab_size") or 0)


def fit_run_vocab(cfg: RunConfig, strict: bool = True) -> None:
    """cfg.model's vocabulary sizes (already filled from the tokenizer) made to keep the resumed
    rows (module docstring); model.export_vocab_size set by hand is kept. strict=False: a resume
    source that cannot be read changes nothing here (the resume reports it on every rank at once,
    CheckpointManager._read, so no rank waits for one that failed alone)."""
    m = cfg.model
    if m.export_vocab_size and m.export_vocab_size < m.real_vocab_size:
        raise ConfigError(f"config key 'model.export_vocab_size': {m.export_vocab_size} rows cannot hold the "
                          f"tokenizer's {m.real_vocab_size} tokens")
    try:
        rows = m.export_vocab_size or resume_rows(cfg)
    except Exception:  # noqa: BLE001 - not strict: CheckpointManager._read reports it on every rank
        if strict:
            raise
        return
    if not rows or rows < m.real_vocab_size:      # fewer rows than tokens: another vocabulary (check_compatible)
        return
    vocab = padded_vocab(rows, math.lcm(m.vocab_multiple, cfg.parallel.tp))
    cfg.model = dataclasses.replace(m, vocab_size=vocab, export_vocab_size=0 if rows == vocab else rows)
