"""The explicit key map between this model and Hugging Face transformers.

pre-LN  -> PegasusForConditionalGeneration (pre-LN, sinusoidal positions sin|cos halves, final LayerNorms)
post-LN -> MarianMTModel                   (post-LN, the same sinusoids, no final LayerNorms)
Both scale embeddings by sqrt(d_model), tie input/output embeddings and add final_logits_bias.
"""
from __future__ import annotations

import re

import torch

from model.transformer import ModelConfig, sinusoid_table

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_ENC_BLOCK = {"self_attn": "self_attn", "attn_block.norm": "self_attn_layer_norm", "ffn.fc1": "fc1",
              "ffn.fc2": "fc2", "ffn_block.norm": "final_layer_norm"}
_DEC_BLOCK = {"self_attn": "self_attn", "cross_attn": "encoder_attn", "self_block.norm": "self_attn_layer_norm",
              "cross_block.norm": "encoder_attn_layer_norm", "ffn.fc1": "fc1", "ffn.fc2": "fc2",
              "ffn_block.norm": "final_layer_norm"}
_LAYER = re.compile(r"^(encoder|decoder)\.(\d+)\.(.+)\.(weight|bias)$")


def hf_class_name(c: ModelConfig) -> str:
    return "PegasusForConditionalGeneration" if c.norm == "pre" else "MarianMTModel"


def to_hf_key(key: str) -> str:
    if key == "embed.weight":
        return "model.shared.weight"
    if key in ("encoder_norm.weight", "encoder_norm.bias", "decoder_norm.weight", "decoder_norm.bias"):
        side, p = key.split("_norm.")
        return f"model.{side}.layer_norm.{p}"
    m = _LAYER.match(key)
    if not m:
        raise KeyError(f"no Hugging Face name for parameter '{key}'")
    side, i, mod, p = m.groups()
    table = _ENC_BLOCK if side == "encoder" else _DEC_BLOCK
    for ours, theirs in table.items():
        if mod == ours:
            return f"model.{side}.layers.{i}.{theirs}.{p}"
        if mod.startswith(ours + "."):
            return f"model.{side}.layers.{i}.{theirs}.{_ATTN[mod[len(ours) + 1:]]}.{p}"
    raise KeyError(f"no Hugging Face name for parameter '{key}'")


def to_hf_state_dict(sd: dict, c: ModelConfig) -> dict:
    """Our (unsharded) parameters -> HF tensors, plus the fixed buffers HF keeps in its state dict."""
    out = {to_hf_key(k): v for k, v in sd.items()}
    pos = sinusoid_table(c.max_positions, c.d_model)
    out["model.encoder.embed_positions.weight"] = pos
    out["model.decoder.embed_positions.weight"] = pos.clone()
    bias = torch.zeros(1, c.vocab_size)
    bias[0, (c.real_vocab_size or c.vocab_size):] = -1e9
    out["final_logits_bias"] = bias
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict) -> dict:
    """Inverse of to_hf_state_dict for the trainable parameters (buffers are recomputed)."""
    inverse = {}
    for k, v in hf.items():
        if k in ("final_logits_bias", "lm_head.weight") or "embed_positions" in k or k.endswith("embed_tokens.weight"):
            continue
        inverse[_from_hf_key(k)] = v
    return inverse


def _from_hf_key(key: str) -> str:
    if key == "model.shared.weight":
        return "embed.weight"
    m = re.match(r"^model\.(encoder|decoder)\.layer_norm\.(weight|bias)$", key)
    if m:
        return f"{m.group(1)}_norm.{m.group(2)}"
    m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not m:
        raise KeyError(f"unexpected Hugging Face parameter '{key}'")
    side, i, mod, p = m.groups()
    table = _ENC_BLOCK if side == "encoder" else _DEC_BLOCK
    for ours, theirs in table.items():
        if mod == theirs:
            return f"{side}.{i}.{ours}.{p}"
        for a, b in _ATTN.items():
            if mod == f"{theirs}.{b}":
                return f"{side}.{i}.{ours}.{a}.{p}"
    raise KeyError(f"unexpected Hugging Face parameter '{key}'")


def hf_config(c: ModelConfig, max_length: int = 256):
    """A stock transformers config computing the same function as ModelConfig c."""
    if abs(c.layer_norm_eps - 1e-5) > 1e-12:
        raise ValueError(f"model.layer_norm_eps={c.layer_norm_eps}: the Hugging Face classes use 1e-5")
    common = dict(vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.n_encoder_layers,
                  decoder_layers=c.n_decoder_layers, encoder_attention_heads=c.n_heads,
                  decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.d_ff, decoder_ffn_dim=c.d_ff,
                  activation_function=c.activation, dropout=c.dropout, attention_dropout=c.attention_dropout,
                  activation_dropout=0.0, max_position_embeddings=c.max_positions, scale_embedding=True,
                  pad_token_id=c.pad_id, eos_token_id=c.eos_id, decoder_start_token_id=c.decoder_start_id,
                  forced_eos_token_id=None, tie_word_embeddings=True, is_encoder_decoder=True)
    if c.norm == "pre":
        from transformers import PegasusConfig
        return PegasusConfig(**common)
    from transformers import MarianConfig
    return MarianConfig(decoder_vocab_size=c.vocab_size, share_encoder_decoder_embeddings=True, **common)


def model_config_from_hf(hf_cfg) -> ModelConfig:
    norm = {"pegasus": "pre", "marian": "post"}.get(hf_cfg.model_type)
    if norm is None:
        raise ValueError(f"model_type '{hf_cfg.model_type}' is not supported (pegasus or marian)")
    return ModelConfig(vocab_size=hf_cfg.vocab_size, real_vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.d_model,
                       n_heads=hf_cfg.encoder_attention_heads, d_ff=hf_cfg.encoder_ffn_dim,
                       n_encoder_layers=hf_cfg.encoder_layers, n_decoder_layers=hf_cfg.decoder_layers, norm=norm,
                       activation=hf_cfg.activation_function, dropout=hf_cfg.dropout,
                       attention_dropout=hf_cfg.attention_dropout, max_positions=hf_cfg.max_position_embeddings,
                       pad_id=hf_cfg.pad_token_id, eos_id=hf_cfg.eos_token_id,
                       decoder_start_id=hf_cfg.decoder_start_token_id)
