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

import torch
import torch.nn.functional as F
import yaml

from common.atomic import atomic_write
from common.errors import UserError
from data.mixture import Component
from data.sources import resolve_source
from data.spec import StreamSpec
from data.stream import DataStream
from data.tokenizer import load_tokenizer, sentinel_ids
from data.ul2 import mode_ids, parse_table
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
    d = _settings(model_dir)
    objective = objective or d.get("objective") or "pairs"
    tok = load_tokenizer(os.path.join(model_dir, "tokenizer.json"))
    table = parse_table(d.get("ul2") or [])
    modes = mode_ids(table, tok.token_to_id) if objective == "ul2" else []
    return StreamSpec(components=[Component("", resolve_source(data, ""), objective)],
                      num_streams=int(d.get("num_streams", 8)), shuffle_block=int(d.get("shuffle_block", 1024)),
                      seed=int(d.get("seed", 1234)), global_batch=batch_size,
                      max_src_len=int(d.get("max_src_len", 128)), max_tgt_len=int(d.get("max_tgt_len", 128)),
                      noise_density=float(d.get("noise_density", 0.15)),
                      mean_span_length=float(d.get("mean_span_length", 3.0)), sentinel_ids=sentinel_ids(tok),
                      ul2=table, ul2_modes=modes, shuffle=False, pack=bool(d.get("pack", True)), bucket_window=0)


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
        raise UserError(f"eval: no target tokens in {data}")
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
