"""Generation through stock transformers from a converted folder (what users run after export).

Device: "auto" is cuda when a GPU is visible, else cpu. Precision: inference_precision(), the one
place that decides it (the run's own train.precision on a GPU, fp32 on CPU, unless asked). bf16
runs as the trainer ran it: torch.autocast over the fp32 weights (matmuls in bf16; norms, softmax
and the loss in fp32), so `encdec eval` reproduces the trainer's bf16 validation loss; weights
converted to bf16 would also round the norms and the residual stream, which training never did.
Autocast casts each weight once per generate() call (its weight cache); the fp32 weights cost
twice the memory of bf16 ones, which no model of this project notices on a GPU.

Batching: inputs are tokenized a window at a time (WINDOW_BATCHES batches), sorted by length,
longest first (little padding; the slowest batches come first, so an ETA errs long), generated in
batches and returned in input order one window at a time, so a file of any size streams.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import yaml

from common.errors import UserError
from launcher.hf.card import CONFIG_FILE            # the run's effective config, written by the export
from launcher.precision import NAMES as PRECISIONS, Precision

WINDOW_BATCHES = 16                    # batches sorted by length together


def folder_config(model_dir: str) -> dict:
    """The run's effective config saved in the folder ({} for a folder exported elsewhere)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    return cfg if isinstance(cfg, dict) else {}


def pick_device(request: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as torch names it."""
    if request in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(request)
    except RuntimeError:
        raise UserError(f"--device {request!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {request}: no GPU is visible to torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {request}: only {torch.cuda.device_count()} GPU(s) visible")
    return str(dev)


def inference_precision(model_dir: str, device: str, request: str = "auto") -> str:
    """"fp32" or "bf16" for running this folder on `device` (the one place that decides it).

    An explicit request wins. "auto": on a GPU the precision the model was trained in (the
    folder's train.precision, fp32 when unknown); on CPU fp32 (bf16 autocast is slower there,
    bench figures in the README, and only equal within bf16 rounding)."""
    if request not in ("auto", *PRECISIONS):
        raise UserError(f"--dtype {request!r}: must be auto, fp32 or bf16")
    if request != "auto":
        return request
    trained = (folder_config(model_dir).get("train") or {}).get("precision")
    return Precision(trained if trained in PRECISIONS else "fp32").inference_name(device)


@dataclass
class Loaded:
    """A folder loaded for inference: tokenizer, model (fp32 weights on `device`), precision."""
    tok: Any
    model: Any
    device: str
    precision: str

    def autocast(self):
        """Precision.inference: autocast in the run's precision, attention kernels fit for changing shapes."""
        return Precision(self.precision).inference(self.device)


def load(model_dir: str, device: str = "auto", precision: str = "auto") -> Loaded:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"not a converted model folder (no config.json): {model_dir}")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    dev = pick_device(device)
    prec = inference_precision(model_dir, dev, precision)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(dev)
    return Loaded(tok, model, dev, prec)


def max_input_length(tok, model) -> int | None:
    """The longest input the folder takes: the tokenizer's model_max_length (the export records the
    training length) and the model's position table, whichever is smaller; None when neither says."""
    limits = [n for n in (getattr(tok, "model_max_length", None), getattr(model.config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 10 ** 9]
    return min(limits) if limits else None


def tokenize(m: Loaded, texts: list[str], first: int = 0, what: str = "input") -> list[list[int]]:
    """Token ids of each text; longer than max_input_length: truncated with a warning naming the
    input (its number counts from `first`)."""
    ids = m.tok(list(texts))["input_ids"]
    limit = max_input_length(m.tok, m.model)
    if limit is not None:
        for i, x in enumerate(ids):
            if len(x) > limit:
                print(f"encdec: warning: {what} {first + i} has {len(x)} tokens, more than the model's {limit}: "
                      f"truncated to {limit}", file=sys.stderr)
                ids[i] = m.tok(texts[i], truncation=True, max_length=limit)["input_ids"]
    return ids


def _pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) ids and attention mask."""
    S = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def fit_new_tokens(m: Loaded, max_new_tokens: int) -> int:
    """max_new_tokens, capped to what the decoder's position table holds, the start token
    included (a longer generation would index past it; T5's relative positions have no limit)."""
    positions = getattr(m.model.config, "max_position_embeddings", None)
    return min(max_new_tokens, positions - 1) if isinstance(positions, int) and positions > 1 else max_new_tokens


def generate_ids(m: Loaded, rows: list[list[int]], num_beams: int = 1, max_new_tokens: int = 64,
                 batch_size: int = 64, progress=None) -> list[str]:
    """Decoded generations of token-id inputs, in their order; batches of similar lengths."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    pad = m.tok.pad_token_id if m.tok.pad_token_id is not None else m.model.config.pad_token_id
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[str] = [""] * len(rows)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = _pad([rows[i] for i in idx], pad, m.device)
        with torch.inference_mode(), m.autocast():
            gen = m.model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens, do_sample=False)
        for i, text in zip(idx, m.tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = text
        if progress is not None:
            progress.update(len(idx))
    return out


def stream_generate(m: Loaded, texts: Iterable[str], num_beams: int = 1, max_new_tokens: int = 64,
                    batch_size: int = 64, progress=None) -> Iterator[list[str]]:
    """Generations of `texts` in input order, one list per window of WINDOW_BATCHES batches (so
    output can be written while the rest is read)."""
    window, done = [], 0
    max_new_tokens = fit_new_tokens(m, max_new_tokens)
    for t in texts:
        window.append(t)
        if len(window) == batch_size * WINDOW_BATCHES:
            yield generate_ids(m, tokenize(m, window, done), num_beams, max_new_tokens, batch_size, progress)
            done += len(window)
            window = []
    if window:
        yield generate_ids(m, tokenize(m, window, done), num_beams, max_new_tokens, batch_size, progress)


def generate(model_dir: str, texts: list[str], num_beams: int = 1, max_new_tokens: int = 64,
             batch_size: int = 64, loaded: Loaded | None = None, device: str = "auto", precision: str = "auto",
             progress=None) -> list[str]:
    m = loaded or load(model_dir, device, precision)
    return [g for part in stream_generate(m, texts, num_beams, max_new_tokens, batch_size, progress) for g in part]
