"""A Hugging Face folder of a registered architecture read as a checkpoint to start from (format "hf").

hf_state(HF_DIR) validates the folder and describes it for reader.CheckpointReader: our model
config, and for every parameter of ours the file and tensor name holding it (the explicit key map
of the architecture's adapter, inverted). The architecture is found by the folder's model_type
(model/registry.py), which reads its config.json both as transformers parses it and as written
(what the writing version meant, e.g. T5's head: model/t5_hf.py) and decides the rest from the
tensors; what our model cannot represent is refused with one line by its adapter (e.g. the seed
model's: a trained final_logits_bias, untied output embeddings, position tables other than the
sinusoids). The config describes the folder's own rows (vocab_size); a run pads them to its
vocab_multiple and TP degree and records the count for exports (launcher/checkpoint/vocab.py).
"""
from __future__ import annotations

import json
import os

import torch

from data.tokenizer import load_tokenizer
from launcher.checkpoint.format import CheckpointError, load_pt
from launcher.config import RunConfig, config_to_dict
from model import for_hf_model_type


def _weights_index(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> the file holding it (single or sharded safetensors, or a weights_only .bin)."""
    st, idx = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(st):
        from safetensors import safe_open
        with safe_open(st, framework="pt") as f:
            return {k: st for k in f.keys()}
    if os.path.isfile(idx):
        with open(idx, encoding="utf-8") as f:
            return {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
    binf = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(binf):
        return {k: binf for k in load_pt(binf)}
    raise CheckpointError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _tensor(files: dict, cache: dict, key: str) -> torch.Tensor:
    path = files[key]
    if path not in cache:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            cache[path] = safe_open(path, framework="pt")
        else:
            cache[path] = load_pt(path)
    f = cache[path]
    return f[key] if isinstance(f, dict) else f.get_tensor(key)


def hf_state(hf_dir: str) -> dict:
    """A trainer state (format "hf") describing the folder for reader.CheckpointReader; validates it."""
    from transformers import AutoConfig          # deferred: transformers takes seconds to import
    hf_dir = os.path.abspath(hf_dir)
    try:
        hcfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    try:
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
            written = json.load(f)                 # as written: what another version's parsing may hide
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {e}") from None
    try:
        adapter = for_hf_model_type(hcfg.model_type).hf
        mc = adapter.folder_config(hcfg, written if isinstance(written, dict) else {})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    files, cache = _weights_index(hf_dir), {}
    try:
        mc = adapter.check_folder(hf_dir, hcfg, mc, set(files), lambda k: _tensor(files, cache, k))
        names = adapter.from_hf_state_dict({k: k for k in files}, mc)   # our name -> HF name (tied/fixed dropped)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
    tok = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tok) and mc.real_vocab_size == mc.vocab_size:
        # a tokenizer smaller than the embedding (T5: 32100 tokens in 32128 rows): the run counts tokens
        mc.real_vocab_size = min(mc.vocab_size, load_tokenizer(tok).get_vocab_size())
    weights = {ours: (files[k], k) for ours, k in names.items()}
    cfg = RunConfig(model=mc)                  # vocab_size: the folder's rows (a run pads them: vocab.py)
    cfg.data.max_src_len = min(cfg.data.max_src_len, mc.max_positions)
    cfg.data.max_tgt_len = min(cfg.data.max_tgt_len, mc.max_positions - 1)
    return {"format": "hf", "step": 0, "tokens_seen": 0, "data": None, "layout": None,
            "config": config_to_dict(cfg), "weights": weights, "source": hf_dir}
