"""`encdec convert CHECKPOINT OUT`: a training checkpoint (any ZeRO stage, any TP degree) -> a Hugging Face folder.

OUT holds config.json, model.safetensors, generation_config.json and the tokenizer, loadable by
AutoModelForSeq2SeqLM / AutoTokenizer.from_pretrained(OUT) with stock transformers, and a model
card (README.md, card.py) with the effective config (encdec_config.yaml).

Offline, one process, bounded memory: the weights are read one parameter at a time from the
checkpoint's files (memory-mapped, launcher/checkpoint/reader.py: the optimizer state is never read)
and streamed into model.safetensors (st_writer.py), so the process holds about one
parameter beyond the mapped fp32 weight pages. Files are verified against the sizes and sha256
recorded at save time first. Written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from common.atomic import atomic_dir
from data.tokenizer import save_hf_tokenizer
from launcher import run_files
from launcher.checkpoint.format import CheckpointError, read_state, resolve_checkpoint, verify_files
from launcher.checkpoint.reader import CheckpointReader
from launcher.config import config_from_dict, config_to_dict
from launcher.hf.card import write_card
from launcher.hf.st_writer import StreamingSafetensorsWriter
from model import arch_of, count_parameters


def _hf_tensors(reader: CheckpointReader, mc):
    """(specs, iterator of (HF name, tensor)) for model.safetensors, one parameter at a time."""
    adapter = arch_of(mc).hf                       # the architecture's HF adapter (model/hf_base.py)
    keys, extra = adapter.key_map(mc), adapter.fixed_tensors(mc)
    rows, vocab_rows = mc.hf_vocab_size, set(adapter.vocab_rows(mc))   # padded rows cut off (hf_vocab_size)

    def shape(n, s):
        return (rows, *s[1:]) if n in vocab_rows else tuple(s)
    specs = [(keys[n], torch.float32, shape(n, s)) for n, s in reader.shapes.items()]
    specs += [(k, torch.float32, tuple(v.shape)) for k, v in extra.items()]

    def items():
        for n in reader.names():
            t = reader.get(n)
            yield keys[n], (t[:rows].contiguous() if n in vocab_rows else t)
        yield from extra.items()
    return specs, items()


def write_hf_weights(reader: CheckpointReader, path: str, progress: bool = True) -> None:
    mc = reader.cfg.model
    specs, items = _hf_tensors(reader, mc)
    with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as w:
        for name, t in tqdm(items, total=len(specs), desc="export", unit="tensor", disable=not progress,
                            mininterval=0.5):
            w.write(name, t)


def convert(checkpoint: str, out: str, overwrite: bool = False, verify: bool = True, progress: bool = True) -> str:
    root, tag = resolve_checkpoint(checkpoint)
    tag_dir = os.path.join(root, tag)
    state = read_state(tag_dir)
    if state.get("files") is not None or state["format"] == "deepspeed":
        verify_files(tag_dir, state, full=verify)
    cfg = config_from_dict(state["config"])
    mc = cfg.model
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"output folder exists: {out} (pass --overwrite)")
    tok = os.path.join(tag_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        tok = os.path.join(root, "tokenizer.json")          # checkpoints written before one per tag
    if not os.path.isfile(tok):
        raise CheckpointError(f"checkpoint {tag_dir} has no tokenizer.json")
    if not mc.real_vocab_size <= mc.hf_vocab_size <= mc.vocab_size:
        raise CheckpointError(f"checkpoint {tag_dir}: model.export_vocab_size={mc.export_vocab_size} must lie "
                              f"between the {mc.real_vocab_size} tokens and the {mc.vocab_size} rows it holds")
    reader = CheckpointReader(tag_dir, state)
    with atomic_dir(out) as tmp:
        from transformers import GenerationConfig     # deferred: transformers takes seconds to import
        adapter = arch_of(mc).hf
        try:
            hcfg = adapter.hf_config(mc)
        except ValueError as e:                # a setting the transformers class cannot represent
            raise CheckpointError(f"checkpoint {tag_dir}: {e}") from None
        hcfg.architectures = [adapter.class_name(mc)]
        hcfg.save_pretrained(tmp)
        overrides = adapter.config_json_overrides(mc)
        if overrides:                          # T5: the head's tying as every transformers version reads it
            path = os.path.join(tmp, "config.json")
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({**saved, **overrides}, f, indent=2, sort_keys=True)
        forced = mc.forced_bos_id if mc.forced_bos_id >= 0 else None     # BART's <s> after the start token
        GenerationConfig(decoder_start_token_id=mc.decoder_start_id, eos_token_id=mc.eos_id, pad_token_id=mc.pad_id,
                         bos_token_id=mc.decoder_start_id if forced is None else forced, forced_bos_token_id=forced,
                         forced_eos_token_id=mc.forced_eos_id if mc.forced_eos_id >= 0 else None,
                         max_new_tokens=cfg.data.max_tgt_len).save_pretrained(tmp)
        write_hf_weights(reader, os.path.join(tmp, "model.safetensors"), progress=progress)
        save_hf_tokenizer(tok, tmp, model_max_length=cfg.data.max_src_len)
        write_card(tmp, cfg, state, os.path.dirname(root) if os.path.basename(root) == run_files.CHECKPOINTS else root,
                   adapter.class_name(mc), count_parameters(mc), config_to_dict(cfg))
        with open(os.path.join(tmp, "encdec_source.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": tag_dir, "step": state["step"]}, f)
    return out
