"""Start (or continue) pretraining from a Hugging Face model folder of a registered architecture.

Two ways:
  - `checkpoint.resume=HF_DIR` in a training config: the run starts from the folder's weights
    (fresh optimizer, step 0, data from the start); the run's model settings must match the
    folder's (the error lists the differences) and its tokenizer must have the same vocabulary.
    The folder's rows (any count) are padded to the run's vocab_multiple and TP degree, and
    exports cut them back (launcher/checkpoint/vocab.py).
  - `encdec import HF_DIR OUT`: writes an encdec checkpoint (layout-free format:
    model.safetensors keyed by our parameter names, trainer_state.json, tokenizer.json), usable
    as `checkpoint.resume=OUT` and by `encdec convert`; prints the model settings to train with.

HF -> encdec -> HF is bitwise: the weights are renamed, never recomputed. The folder is read and
validated by launcher/checkpoint/hf_folder.py (what our model cannot represent is refused there).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import yaml
from tqdm import tqdm

from common.atomic import atomic_dir, file_digest
from launcher.checkpoint.format import STATE_FILE, CheckpointError
from launcher.checkpoint.hf_folder import hf_state
from launcher.checkpoint.reader import CheckpointReader
from launcher.hf.st_writer import StreamingSafetensorsWriter

# what a run sets itself: the tokenizer's size, padded (to any model.vocab_multiple and TP degree)
# up from the folder's rows, which exports get back (launcher/checkpoint/vocab.py)
DERIVED = ("vocab_size", "real_vocab_size", "vocab_multiple", "export_vocab_size")


def import_hf(hf_dir: str, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the folder as an encdec checkpoint (layout-free) at OUT; returns its trainer state."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"not a Hugging Face model folder (no config.json): {hf_dir}")
    state = hf_state(hf_dir)
    tok = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        raise CheckpointError(f"{hf_dir}: no tokenizer.json (a fast tokenizer is needed to train on)")
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"output folder exists: {out} (pass --overwrite)")
    reader = CheckpointReader(hf_dir, state)
    with atomic_dir(out) as tmp:
        specs = [(n, torch.float32, s) for n, s in reader.shapes.items()]
        with StreamingSafetensorsWriter(os.path.join(tmp, "model.safetensors"), specs, {"format": "pt"}) as w:
            for n in tqdm(reader.names(), desc="import", unit="tensor", disable=not progress, mininterval=0.5):
                w.write(n, reader.get(n))
        shutil.copyfile(tok, os.path.join(tmp, "tokenizer.json"))
        saved = {k: v for k, v in state.items() if k not in ("weights",)}
        saved.update(format="layout-free", format_version=1,
                     files={f: file_digest(os.path.join(tmp, f)) for f in ("model.safetensors", "tokenizer.json")})
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=1)
    return saved


def import_and_report(hf_dir: str, out: str, overwrite: bool = False) -> None:
    """`encdec import`: writes OUT and prints the model settings to train with."""
    st = import_hf(hf_dir, out, overwrite=overwrite)
    print(f"wrote {out}; train from it with checkpoint.resume={out} and these model settings:")
    model = {k: v for k, v in st["config"]["model"].items() if k not in DERIVED}
    print(yaml.safe_dump({"model": model}, sort_keys=False), end="")
