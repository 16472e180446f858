"""The explicit key map between this model and Hugging Face transformers.

pre-LN  -> PegasusForConditionalGeneration (pre-LN, sinusoidal positions sin|cos halves, final LayerNorms)
post-LN -> MarianMTModel                   (post-LN, the same sinusoids, no final LayerNorms)
Both scale embeddings by sqrt(d_model), tie input/output embeddings and add final_logits_bias.
"""
from __future__ import annotations

import torch

from model.transformer import ModelConfig, sinusoid_table, vocab_logits_bias

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_ENC_BLOCK = {"self_attn": "self_attn", "attn_block.norm": "self_attn_layer_norm", "ffn.fc1": "fc1",
              "ffn.fc2": "fc2", "ffn_block.norm": "final_layer_norm"}
_DEC_BLOCK = {"self_attn": "self_attn", "cross_attn": "encoder_attn", "self_block.norm": "self_attn_layer_norm",
              "cross_block.norm": "encoder_attn_layer_norm", "ffn.fc1": "fc1", "ffn.fc2": "fc2",
              "ffn_block.norm": "final_layer_norm"}
# Hugging Face tensors that are not parameters of ours: fixed tables we recompute, tied copies.
HF_FIXED = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight", "final_logits_bias")
HF_TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def hf_class_name(c: ModelConfig) -> str:
    return "PegasusForConditionalGeneration" if c.norm == "pre" else "MarianMTModel"


def hf_key_map(c: ModelConfig) -> dict[str, str]:
    """The explicit map: every parameter name of ours -> its Hugging Face tensor name.

    Import uses the same table inverted (hf_to_ours), so the two directions cannot disagree.
    """
    keys = {"embed.weight": "model.shared.weight"}
    for side, n_layers, block in (("encoder", c.n_encoder_layers, _ENC_BLOCK), ("decoder", c.n_decoder_layers, _DEC_BLOCK)):
        for i in range(n_layers):
            for ours, theirs in block.items():
                subs = _ATTN.items() if ours.endswith("attn") else [("", "")]
                for a, b in subs:
                    for p in ("weight", "bias"):
                        o = f"{ours}.{a}" if a else ours
                        t = f"{theirs}.{b}" if b else theirs
                        keys[f"{side}.{i}.{o}.{p}"] = f"model.{side}.layers.{i}.{t}.{p}"
        if c.norm == "pre":
            for p in ("weight", "bias"):
                keys[f"{side}_norm.{p}"] = f"model.{side}.layer_norm.{p}"
    return keys


def hf_to_ours(c: ModelConfig) -> dict[str, str]:
    """hf_key_map inverted: Hugging Face tensor name -> our parameter name."""
    return {theirs: ours for ours, theirs in hf_key_map(c).items()}


def hf_fixed_tensors(c: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors that are functions of the config: position tables and final_logits_bias."""
    pos = sinusoid_table(c.max_positions, c.d_model)
    return {"model.encoder.embed_positions.weight": pos, "model.decoder.embed_positions.weight": pos.clone(),
            "final_logits_bias": vocab_logits_bias(c)[None]}


def to_hf_state_dict(sd: dict, c: ModelConfig) -> dict:
    """Our (unsharded) parameters -> HF tensors, plus the fixed tensors HF keeps in its state dict."""
    keys = hf_key_map(c)
    out = {keys[k]: v for k, v in sd.items()}
    out.update(hf_fixed_tensors(c))
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict, c: ModelConfig) -> dict:
    """Inverse of to_hf_state_dict for the trainable parameters (fixed and tied tensors are dropped).

    Raises KeyError naming a Hugging Face tensor this model has no place for.
    """
    return rename_from_hf(hf, hf_to_ours(c), set(HF_FIXED) | set(HF_TIED))


def rename_from_hf(hf: dict, names: dict[str, str], skip) -> dict:
    """HF tensors -> ours through an inverted key map; tensors in `skip` are dropped; a name the map
    does not know raises KeyError naming it (shared by every architecture's adapter)."""
    out = {}
    for k, v in hf.items():
        if k in skip:
            continue
        if k not in names:
            raise KeyError(f"unexpected Hugging Face parameter '{k}'")
        out[names[k]] = v
    return out


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
        raise ValueError(f"model_type '{hf_cfg.model_type}' is not supported (pegasus, marian or t5)")
    return ModelConfig(vocab_size=hf_cfg.vocab_size, real_vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.d_model,
                       n_heads=hf_cfg.encoder_attention_heads, d_ff=hf_cfg.encoder_ffn_dim,
                       n_encoder_layers=hf_cfg.encoder_layers, n_decoder_layers=hf_cfg.decoder_layers, norm=norm,
                       activation=hf_cfg.activation_function, dropout=hf_cfg.dropout,
                       attention_dropout=hf_cfg.attention_dropout, max_positions=hf_cfg.max_position_embeddings,
                       pad_id=hf_cfg.pad_token_id, eos_id=hf_cfg.eos_token_id,
                       decoder_start_id=hf_cfg.decoder_start_token_id)
