"""A Hugging Face Pegasus, Marian or T5 (v1.1 layout) folder read as a checkpoint to start from (format "hf").

hf_state(HF_DIR) validates the folder and describes it for reader.CheckpointReader: our model
config, and for every parameter of ours the file and tensor name holding it (the explicit key map
of model/hf_adapter.py, inverted). What our model cannot represent is refused with one line: a
trained final_logits_bias (ours is 0 on the real vocabulary and -1e9 on padding rows, which fixes
real_vocab_size), untied output embeddings, position tables other than the sinusoids, unscaled
embeddings.
"""
from __future__ import annotations

import json
import os

import torch

from data.tokenizer import load_tokenizer
from launcher.checkpoint.format import CheckpointError, load_pt
from launcher.config import RunConfig, config_to_dict
from model.hf_adapter import HF_TIED, from_hf_state_dict, model_config_from_hf
from model.t5_hf import from_hf_state_dict as t5_names
from model.t5_hf import hf_tied
from model.t5_hf import model_config_from_hf as t5_config
from model.transformer import sinusoid_table


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


def _real_vocab(bias: torch.Tensor, where: str) -> int:
    """final_logits_bias (1, V): zeros, then (optionally) <= -1e8 on padding rows -> the real vocabulary."""
    b = bias.reshape(-1)
    nz = (b != 0).nonzero()
    r = int(nz[0]) if len(nz) else b.numel()
    if not bool((b[r:] <= -1e8).all()):
        raise CheckpointError(f"{where}: final_logits_bias holds trained values; this model has no output bias "
                              f"(only 0 on the vocabulary and -1e9 on padding rows are supported)")
    return r


def hf_state(hf_dir: str) -> dict:
    """A trainer state (format "hf") describing the folder for reader.CheckpointReader; validates it."""
    from transformers import AutoConfig          # deferred: transformers takes seconds to import
    hf_dir = os.path.abspath(hf_dir)
    try:
        hcfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    if hcfg.model_type in ("t5", "mt5"):
        return _t5_state(hf_dir, hcfg)
    try:
        mc = model_config_from_hf(hcfg)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{hf_dir}/config.json: {str(e).splitlines()[0]}") from None
    checks = [("scale_embedding", True), ("tie_word_embeddings", True),
              ("decoder_attention_heads", hcfg.encoder_attention_heads), ("decoder_ffn_dim", hcfg.encoder_ffn_dim)]
    if hcfg.model_type == "marian":
        checks += [("share_encoder_decoder_embeddings", True), ("decoder_vocab_size", hcfg.vocab_size)]
    for key, want in checks:
        got = getattr(hcfg, key, want)
        if got != want and not (key == "decoder_vocab_size" and got is None):
            raise CheckpointError(f"{hf_dir}/config.json: {key}={got!r} is not supported (needs {want!r})")
    files, cache = _weights_index(hf_dir), {}
    if "final_logits_bias" in files:
        mc.real_vocab_size = _real_vocab(_tensor(files, cache, "final_logits_bias"), hf_dir)
    shared = _tensor(files, cache, "model.shared.weight") if "model.shared.weight" in files else None
    table = sinusoid_table(mc.max_positions, mc.d_model)
    for k in files:
        if k in HF_TIED:
            if shared is not None and not torch.equal(_tensor(files, cache, k), shared):
                raise CheckpointError(f"{hf_dir}: {k} differs from model.shared.weight (untied embeddings)")
        if "embed_positions" in k and not torch.equal(_tensor(files, cache, k).float(), table):
            raise CheckpointError(f"{hf_dir}: {k} is not the sinusoid table of {mc.max_positions} x {mc.d_model}")
    try:
        names = from_hf_state_dict({k: k for k in files}, mc)     # our name -> HF name (tied/fixed ones dropped)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
    return _state(hf_dir, mc, files, names)


def _state(hf_dir: str, mc, files: dict, names: dict) -> dict:
    weights = {ours: (files[k], k) for ours, k in names.items()}
    mc.vocab_multiple = mc.vocab_size          # a config with these settings pads the tokenizer to this size
    cfg = RunConfig(model=mc)
    cfg.data.max_src_len = min(cfg.data.max_src_len, mc.max_positions)
    cfg.data.max_tgt_len = min(cfg.data.max_tgt_len, mc.max_positions - 1)
    return {"format": "hf", "step": 0, "tokens_seen": 0, "data": None, "layout": None,
            "config": config_to_dict(cfg), "weights": weights, "source": hf_dir}


def _t5_state(hf_dir: str, hcfg) -> dict:
    """hf_state of a T5ForConditionalGeneration folder (model.arch=t5, the key map of model/t5_hf.py)."""
    try:
        mc = t5_config(hcfg)
    except ValueError as e:
        raise CheckpointError(f"{hf_dir}/config.json: {e}") from None
    files, cache = _weights_index(hf_dir), {}
    if "shared.weight" not in files:
        raise CheckpointError(f"{hf_dir}: no shared.weight (the token embedding)")
    shared = _tensor(files, cache, "shared.weight")
    for k in hf_tied(mc):
        if k in files and not torch.equal(_tensor(files, cache, k), shared):
            raise CheckpointError(f"{hf_dir}: {k} differs from shared.weight, but tie_word_embeddings is true "
                                  "(the head's d_model^-0.5 rescale applies to tied heads only)")
    if not mc.tie_embeddings and "lm_head.weight" not in files:
        raise CheckpointError(f"{hf_dir}: tie_word_embeddings=false but the folder has no lm_head.weight")
    try:
        names = t5_names({k: k for k in files}, mc)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}: {e.args[0]}") from None
    tok = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tok):                    # T5 pads its 32100 tokens to 32128 rows; the run counts tokens
        mc.real_vocab_size = load_tokenizer(tok).get_vocab_size()
    return _state(hf_dir, mc, files, names)
