"""Generation through stock transformers from a converted folder (what users run after export)."""
from __future__ import annotations

import os


def load(model_dir: str):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"not a converted model folder (no config.json): {model_dir}")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    return tok, model


def generate(model_dir: str, texts: list[str], num_beams: int = 1, max_new_tokens: int = 64,
             batch_size: int = 64, loaded=None) -> list[str]:
    import torch
    tok, model = loaded or load(model_dir)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
        out += tok.batch_decode(ids, skip_special_tokens=True)
    return out
