"""`encdec eval HF_FOLDER DATA`: an exported model on prepared shards, through stock transformers.

Loss and perplexity: the summed token cross-entropy over DATA's examples divided by their target
tokens, computed from the transformers model's logits. The examples are the trainer's validation
examples (the same stream: no shuffle, every sample once, span noise keyed by position), built
with the data settings of the run that made the folder (its encdec_config.yaml; options override),
so the loss is the trainer's validation loss on the same shards. For pairs, the first
--max-generate sources are also decoded (greedy, or beam search with --num-beams) and scored with
BLEU and chrF against their targets. Printed as a table; written as JSON (atomically).
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F
import yaml

from common.atomic import atomic_write
from data.resolve import Where, component, fields_of
from data.spec import StreamSpec, vocab_of
from data.stream import DataStream
from launcher.config import data_config
from launcher.hf.card import CONFIG_FILE
from launcher.hf.generate import load
from launcher.monitor.scores import score


def _settings(model_dir: str) -> dict:
    """The data section of the folder's encdec_config.yaml ({} for a folder exported elsewhere)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    return cfg.get("data", {}) if isinstance(cfg, dict) else {}


def _spec(model_dir: str, data: str, objective: str | None, batch_size: int):
    """The trainer's validation stream settings: the run's data section (data.objective overridden by
    `objective`), the folder's tokenizer, DATA resolved as data.valid is."""
    d = data_config({**_settings(model_dir), **({"objective": objective} if objective else {})})
    tok = os.path.join(model_dir, "tokenizer.json")
    where = Where(d.scan_cache, os.path.join(tempfile.gettempdir(), "encdec-scan"))   # raw shards: their counts
    comp = component("", data, "", d.objective, 1.0, fields_of(d, d.objective), tok, where)
    return StreamSpec(d, [comp], batch_size, False, vocab_of(tok, d))


def evaluate_folder(model_dir: str, data: str, objective: str | None = None, batch_size: int = 16,
                    num_beams: int = 1, max_generate: int = 256, max_new_tokens: int | None = None) -> dict:
    tok, model = load(model_dir)
    spec = _spec(model_dir, data, objective, batch_size)
    total, count, hyps, refs = 0.0, 0, [], []
    for b in DataStream(spec, 0, 1, batch_size):
        with torch.no_grad():
            logits = model(input_ids=b["src"], attention_mask=b["src_mask"].long(),
                           decoder_input_ids=b["tgt_in"]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((b["labels"] != -100).sum())
        if spec.components[0].objective == "pairs" and len(hyps) < max_generate:
            keep = [i for i in range(len(b["keys"])) if (b["labels"][i] != -100).any()][:max_generate - len(hyps)]
            if keep:
                with torch.no_grad():
                    out = model.generate(input_ids=b["src"][keep], attention_mask=b["src_mask"][keep].long(),
                                         num_beams=num_beams, do_sample=False,
                                         max_new_tokens=max_new_tokens or spec.max_tgt_len)
                hyps += tok.batch_decode(out, skip_special_tokens=True)
                refs += tok.batch_decode([[t for t in b["labels"][i].tolist() if t >= 0] for i in keep],
                                         skip_special_tokens=True)
    if not count:
        raise ValueError(f"eval: no target tokens in {data}")
    loss = total / count
    res = {"model": os.path.abspath(model_dir), "data": data, "objective": spec.components[0].objective,
           "examples": spec.epoch_positions, "target_tokens": count, "loss": loss, "ppl": math.exp(min(loss, 50))}
    if hyps:
        res.update(score(hyps, refs), generated=len(hyps), num_beams=num_beams)
    return res


def table(res: dict) -> str:
    keys = [k for k in ("loss", "ppl", "bleu", "chrf", "generated", "examples", "target_tokens") if k in res]
    w = max(map(len, keys))
    rows = [f"{'metric':{w}s}  value"] + [f"{k:{w}s}  {res[k]:.6g}" if isinstance(res[k], float) else
                                         f"{k:{w}s}  {res[k]}" for k in keys]
    return "\n".join(rows)


def run(model_dir: str, data: str, json_path: str, **kw) -> dict:
    res = evaluate_folder(model_dir, data, **kw)
    atomic_write(json_path, json.dumps(res, indent=1) + "\n")
    return res
