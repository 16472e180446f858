"""The model card (README.md) and the effective config written into every exported folder.

The card states what the folder holds and how it was made: the Hugging Face class and shape, the
parameter count, the training data (manifest summary), steps and tokens seen, the last training
and evaluation metrics of the run (metrics.jsonl, rows up to the exported step), the effective
config, and how to load it. Every figure is read from the checkpoint's own state and the run
folder, never recomputed. encdec_config.yaml holds the effective config as data (what `encdec
eval` reads the data settings from).
"""
from __future__ import annotations

import json
import os

import yaml

from launcher import run_files
from model import arch_of

CONFIG_FILE = "encdec_config.yaml"


def _metrics(run_dir: str, step: int) -> dict[str, dict]:
    """The last "train" and "eval" rows of RUN/metrics.jsonl at or before `step` (empty when absent)."""
    path = os.path.join(run_dir, run_files.METRICS)
    last: dict[str, dict] = {}
    if not os.path.isfile(path):
        return last
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get("kind") in ("train", "eval") and int(r.get("step", -1)) <= step:
                last[r["kind"]] = r
    return last


def _manifest(source: str) -> dict | None:
    """Summary of a local prepared folder's manifest.json (None when the source is not a local folder)."""
    path = source if source.endswith(".json") else os.path.join(source, "manifest.json")
    if not source or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return {"source": source, "objective": m.get("objective"), "samples": m.get("num_samples"),
            "tokens": m.get("num_tokens"), "shards": len(m.get("shards") or []),
            "tokenizer_sha256": m.get("tokenizer_sha256")}


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def card_data(cfg, state: dict, run_dir: str, class_name: str, n_params: int) -> dict:
    """Everything the card shows, as plain data (the test compares it with the run's files)."""
    d = cfg.data
    sources = [d.train] if d.train else [e.source for e in d.mixture]
    rows = _metrics(run_dir, int(state.get("step", 0)))
    return {"class": class_name, "arch": cfg.model.arch, "parameters": n_params, "step": int(state.get("step", 0)),
            "tokens_seen": int(state.get("tokens_seen", 0)), "objective": d.objective,
            "data": [m for m in (_manifest(s) for s in sources) if m],
            "valid": _manifest(d.valid) if d.valid else None,
            "train_metrics": {k: v for k, v in rows.get("train", {}).items() if k not in ("kind", "time")},
            "eval_metrics": {k: v for k, v in rows.get("eval", {}).items() if k not in ("kind", "time")}}


def write_card(out_dir: str, cfg, state: dict, run_dir: str, class_name: str, n_params: int,
               config_dict: dict) -> dict:
    """Writes README.md and encdec_config.yaml into out_dir; returns card_data."""
    c = card_data(cfg, state, run_dir, class_name, n_params)
    m, arch = cfg.model, arch_of(cfg.model)
    width = arch.attention_width(m)
    shape = (f"{m.n_encoder_layers}+{m.n_decoder_layers} layers, d_model {m.d_model}, {m.n_heads} heads"
             + (f" of {width // m.n_heads}" if width != m.d_model else "") + f", d_ff {m.d_ff}, "
             f"vocabulary {m.hf_vocab_size} ({m.real_vocab_size} tokens)")
    kind = arch.describe(m)
    lines = ["---", "library_name: transformers", "pipeline_tag: text2text-generation", "tags: [encdec]", "---", "",
             f"# {cfg.name}", "", f"An encoder-decoder {kind}, trained with encdec and exported as "
             f"`{c['class']}`.", "", "| | |", "|---|---|", f"| architecture | {c['class']}: {shape} |",
             f"| parameters | {c['parameters']:,} |", f"| steps | {c['step']:,} |",
             f"| tokens seen | {c['tokens_seen']:,} |", f"| objective | {c['objective']} |", "", "## Data", ""]
    for x in c["data"] or [{"source": "(no local manifest)"}]:
        lines.append(f"- train: `{x['source']}`" + (f": {x['samples']:,} samples, {x['tokens']:,} tokens in "
                                                    f"{x['shards']} shards ({x['objective']})" if "samples" in x else ""))
    if c["valid"]:
        v = c["valid"]
        lines.append(f"- valid: `{v['source']}`: {v['samples']:,} samples, {v['tokens']:,} tokens")
    lines += ["", "## Last metrics", ""]
    for kind_, key in (("train", "train_metrics"), ("eval", "eval_metrics")):
        row = c[key]
        lines.append(f"- {kind_}: " + (", ".join(f"{k} {_fmt(v)}" for k, v in row.items()) if row else "none logged"))
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "",
              'tok = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER")',
              'model = AutoModelForSeq2SeqLM.from_pretrained("PATH_TO_THIS_FOLDER")',
              'batch = tok(["your input"], return_tensors="pt", truncation=True)',
              "print(tok.batch_decode(model.generate(**batch, num_beams=4, max_new_tokens=64), "
              "skip_special_tokens=True))", "```", "",
              f"Inputs longer than {cfg.data.max_src_len} tokens (the tokenizer's model_max_length) are truncated.", "",
              "## Effective config", "", "```yaml", yaml.safe_dump(config_dict, sort_keys=False).rstrip(), "```", ""]
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        yaml.safe_dump(config_dict, f, sort_keys=False)
    with open(os.path.join(out_dir, "encdec_card.json"), "w", encoding="utf-8") as f:
        json.dump(c, f, indent=1)
    return c
