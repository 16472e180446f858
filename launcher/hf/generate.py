"""Generation through stock transformers from a converted folder (what users run after export)."""
from __future__ import annotations

import os
import sys


def load(model_dir: str):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"not a converted model folder (no config.json): {model_dir}")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    return tok, model


def max_input_length(tok, model) -> int | None:
    """The longest input the folder takes: the tokenizer's model_max_length (the export records the
    training length) and the model's position table, whichever is smaller; None when neither says."""
    limits = [n for n in (getattr(tok, "model_max_length", None), getattr(model.config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 10 ** 9]
    return min(limits) if limits else None


def encode(tok, model, texts: list[str], what: str = "input"):
    """Tokenized, padded batch; inputs longer than max_input_length are truncated with a warning."""
    limit = max_input_length(tok, model)
    if limit is not None:
        for i, ids in enumerate(tok(texts)["input_ids"]):
            if len(ids) > limit:
                print(f"encdec: warning: {what} {i} has {len(ids)} tokens, more than the model's {limit}: "
                      f"truncated to {limit}", file=sys.stderr)
    return tok(texts, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit)


def generate(model_dir: str, texts: list[str], num_beams: int = 1, max_new_tokens: int = 64,
             batch_size: int = 64, loaded=None) -> list[str]:
    import torch
    tok, model = loaded or load(model_dir)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = encode(tok, model, texts[i:i + batch_size])
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
        out += tok.batch_decode(ids, skip_special_tokens=True)
    return out
