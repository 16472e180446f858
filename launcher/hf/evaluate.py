"""`encdec eval HF_FOLDER DATA`: an exported model on prepared shards, through stock transformers.

Loss and perplexity: the summed token cross-entropy over DATA's examples divided by their target
tokens, computed from the transformers model's logits. The examples are the trainer's validation
examples (the same stream: no shuffle, every sample once, span noise keyed by position), built
with the data settings of the run that made the folder (its encdec_config.yaml; options override),
so the loss is the trainer's validation loss on the same shards. For pairs, the sources of the
first N validation examples are also decoded (greedy, or beam search with --num-beams) and scored
with BLEU and chrF against their targets: N is the run's train.eval_generate (the trainer scores
the same examples at each evaluation) unless --max-generate says otherwise; bad samples among them
are not scored. Printed as a table with the number scored; written as JSON (atomically).

On the device and in the precision of launcher/hf/generate.py (a GPU when there is one, the run's
precision there). Examples are read a window of WINDOW_BATCHES batches at a time and regrouped by
length (the summed loss does not depend on the grouping); progress on stderr.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F

from common.atomic import atomic_write
from common.errors import UserError
from data.objectives import collate
from data.resolve import Where, component, fields_of
from data.spec import StreamSpec, vocab_of
from data.stream import DataStream
from launcher.config import TrainConfig, data_config
from launcher.hf.generate import WINDOW_BATCHES, Loaded, fit_new_tokens, folder_config, generate_ids, load
from launcher.hf.progress import Progress
from launcher.monitor.scores import score


def _settings(model_dir: str) -> dict:
    """The data section of the folder's encdec_config.yaml ({} for a folder exported elsewhere)."""
    return folder_config(model_dir).get("data") or {}


def _spec(model_dir: str, data: str, objective: str | None, batch_size: int):
    """The trainer's validation stream settings: the run's data section (data.objective overridden by
    `objective`), the folder's tokenizer, DATA resolved as data.valid is."""
    d = data_config({**_settings(model_dir), **({"objective": objective} if objective else {})})
    tok = os.path.join(model_dir, "tokenizer.json")
    where = Where(d.scan_cache, os.path.join(tempfile.gettempdir(), "encdec-scan"))   # raw shards: their counts
    comp = component("", data, "", d.objective, 1.0, fields_of(d, d.objective), tok, where)
    return StreamSpec(d, [comp], batch_size, False, vocab_of(tok, d))


def eval_generate_default(model_dir: str) -> int:
    """The run's train.eval_generate (what the trainer scored at each evaluation)."""
    n = (folder_config(model_dir).get("train") or {}).get("eval_generate")
    return int(n) if isinstance(n, int) and n >= 0 else TrainConfig().eval_generate


def _rows(b: dict, first: int) -> list[tuple[int, dict]]:
    """A collated batch back into (stream position, sample) rows, without padding; bad samples
    (placeholders: no labels) dropped."""
    out = []
    for i in range(len(b["keys"])):
        n_tgt = int((b["labels"][i] != -100).sum())
        if n_tgt:
            out.append((first + i, {"key": b["keys"][i], "src": b["src"][i][b["src_mask"][i]].numpy(),
                                    "tgt": b["labels"][i][:n_tgt].numpy()}))
    return out


def _batches(spec, batch_size: int, keep: int, kept: list):
    """(samples, stream positions read) batches of the stream's real examples, regrouped by
    length inside windows of WINDOW_BATCHES batches; the samples of the first `keep` positions
    are also appended to `kept` (the ones decoded and scored)."""
    window, pos = [], 0
    for b in DataStream(spec, 0, 1, batch_size):
        for p, smp in _rows(b, pos):
            window.append(smp)
            if p < keep:
                kept.append(smp)
        pos += len(b["keys"])
        if len(window) >= batch_size * WINDOW_BATCHES:
            yield from _regroup(window, batch_size, pos)
            window = []
    yield from _regroup(window, batch_size, pos)


def _regroup(window: list[dict], batch_size: int, pos: int):
    window.sort(key=lambda smp: (len(smp["src"]), len(smp["tgt"])))
    for i in range(0, len(window), batch_size):
        yield window[i:i + batch_size], pos


def _loss(m: Loaded, samples: list[dict], spec) -> tuple[torch.Tensor, int]:
    """(summed token cross-entropy on the device, target tokens) of one batch."""
    b = collate(samples, spec.max_src_len, spec.max_tgt_len)
    with torch.inference_mode(), m.autocast():
        logits = m.model(input_ids=b["src"].to(m.device), attention_mask=b["src_mask"].long().to(m.device),
                         decoder_input_ids=b["tgt_in"].to(m.device)).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].to(m.device).flatten(), ignore_index=-100,
                               reduction="sum")
    return loss.double(), int((b["labels"] != -100).sum())


def evaluate_folder(model_dir: str, data: str, objective: str | None = None, batch_size: int = 32,
                    num_beams: int = 1, max_generate: int | None = None, max_new_tokens: int | None = None,
                    device: str = "auto", precision: str = "auto", quiet: bool = True,
                    loaded: Loaded | None = None) -> dict:
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    m = loaded or load(model_dir, device, precision)
    spec = _spec(model_dir, data, objective, batch_size)
    pairs = spec.components[0].objective == "pairs"
    n_gen = (eval_generate_default(model_dir) if max_generate is None else max_generate) if pairs else 0
    total, count, gen = torch.zeros((), dtype=torch.float64, device=m.device), 0, []
    with Progress(spec.epoch_positions, "eval loss", "examples", quiet) as bar:
        for samples, pos in _batches(spec, batch_size, n_gen, gen):
            loss, n = _loss(m, samples, spec)
            total, count = total + loss, count + n             # summed on the device: no sync per batch
            bar.update(min(pos, spec.epoch_positions) - bar.done)
    if not count:
        raise UserError(f"eval: no target tokens in {data}")
    loss = total.item() / count
    res = {"model": os.path.abspath(model_dir), "data": data, "objective": spec.components[0].objective,
           "examples": spec.epoch_positions, "target_tokens": count, "loss": loss, "ppl": math.exp(min(loss, 50)),
           "device": m.device, "precision": m.precision}
    if gen:
        with Progress(len(gen), "eval generate", "examples", quiet) as bar:
            hyps = generate_ids(m, [s["src"].tolist() for s in gen], num_beams,
                                fit_new_tokens(m, max_new_tokens or spec.max_tgt_len), batch_size, bar)
        refs = m.tok.batch_decode([s["tgt"].tolist() for s in gen], skip_special_tokens=True)
        res.update(score(hyps, refs), generated=len(hyps), num_beams=num_beams)
    return res


def table(res: dict) -> str:
    keys = [k for k in ("loss", "ppl", "bleu", "chrf", "generated", "examples", "target_tokens", "device",
                        "precision") if k in res]
    w = max(map(len, keys))
    rows = [f"{'metric':{w}s}  value"] + [f"{k:{w}s}  {res[k]:.6g}" if isinstance(res[k], float) else
                                         f"{k:{w}s}  {res[k]}" for k in keys]
    return "\n".join(rows)


def run(model_dir: str, data: str, json_path: str, **kw) -> dict:
    res = evaluate_folder(model_dir, data, **kw)
    atomic_write(json_path, json.dumps(res, indent=1) + "\n")
    return res
