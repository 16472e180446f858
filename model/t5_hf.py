"""The explicit key map between model/t5.py and Hugging Face's T5ForConditionalGeneration.

Same interface as model/hf_adapter.py (hf_key_map, hf_to_ours, hf_fixed_tensors, to/from_hf_state_dict,
hf_config, model_config_from_hf), for model.arch=t5. T5 has no fixed tensors (no position tables,
no final_logits_bias); its embed_tokens are aliases of shared.weight, and so is lm_head.weight
when the head is tied (original T5).

transformers 5 note: T5Config always reports tie_word_embeddings=True and keeps the untied-head
information as scale_decoder_outputs (False for v1.1). An untied lm_head is loaded untied by
from_pretrained (it differs from shared.weight; transformers logs that it does not tie them).
The exported config.json records tie_word_embeddings as it is, for every transformers version.
"""
from __future__ import annotations

import torch

from model.hf_adapter import rename_from_hf
from model.transformer import ModelConfig

_ATTN = ("q", "k", "v", "o")
_FFN = ("wi_0", "wi_1", "wo")
# ours (in a layer) -> HF (in block.i): sublayer index and module name
_ENC = {"self_norm": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
        "ffn_norm": "layer.1.layer_norm", "ffn": "layer.1.DenseReluDense"}
_DEC = {"self_norm": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
        "cross_norm": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
        "ffn_norm": "layer.2.layer_norm", "ffn": "layer.2.DenseReluDense"}
BIAS_TABLE = "relative_attention_bias"
# Found in some older T5 checkpoints; T5ForConditionalGeneration ignores it on load (it is never used).
HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def hf_class_name(c: ModelConfig) -> str:
    return "T5ForConditionalGeneration"


def hf_tied(c: ModelConfig) -> tuple[str, ...]:
    """HF tensors that are copies of shared.weight."""
    return ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + (("lm_head.weight",) if c.tie_embeddings else ())


def hf_key_map(c: ModelConfig) -> dict[str, str]:
    """Every parameter name of ours -> its Hugging Face tensor name (import uses it inverted)."""
    keys = {"embed.weight": "shared.weight"}
    for side, n, block in (("encoder", c.n_encoder_layers, _ENC), ("decoder", c.n_decoder_layers, _DEC)):
        for i in range(n):
            for ours, theirs in block.items():
                if ours.endswith("norm"):
                    keys[f"{side}.{i}.{ours}.weight"] = f"{side}.block.{i}.{theirs}.weight"
                    continue
                for lin in (_ATTN if ours.endswith("attn") else _FFN):
                    keys[f"{side}.{i}.{ours}.{lin}.weight"] = f"{side}.block.{i}.{theirs}.{lin}.weight"
            if i == 0:
                keys[f"{side}.0.self_attn.{BIAS_TABLE}.weight"] = f"{side}.block.0.layer.0.SelfAttention.{BIAS_TABLE}.weight"
        keys[f"{side}_norm.weight"] = f"{side}.final_layer_norm.weight"
    if not c.tie_embeddings:
        keys["lm_head.weight"] = "lm_head.weight"
    return keys


def hf_to_ours(c: ModelConfig) -> dict[str, str]:
    return {theirs: ours for ours, theirs in hf_key_map(c).items()}


def hf_fixed_tensors(c: ModelConfig) -> dict[str, torch.Tensor]:
    return {}


def to_hf_state_dict(sd: dict, c: ModelConfig) -> dict:
    keys = hf_key_map(c)
    return {keys[k]: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


def from_hf_state_dict(hf: dict, c: ModelConfig) -> dict:
    """HF tensors -> ours (tied aliases and ignored tensors dropped); KeyError names an unknown one."""
    return rename_from_hf(hf, hf_to_ours(c), set(hf_tied(c)) | set(HF_IGNORED))


def hf_config(c: ModelConfig, max_length: int = 256):
    """A stock T5Config computing the same function as ModelConfig c (arch t5)."""
    from transformers import T5Config
    cfg = T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim or c.d_model // c.n_heads,
                   d_ff=c.d_ff, num_layers=c.n_encoder_layers, num_decoder_layers=c.n_decoder_layers,
                   num_heads=c.n_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
                   relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout,
                   layer_norm_epsilon=c.layer_norm_eps, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                   pad_token_id=c.pad_id, eos_token_id=c.eos_id, decoder_start_token_id=c.decoder_start_id,
                   tie_word_embeddings=c.tie_embeddings)
    cfg.n_positions = c.max_positions              # recorded as older T5 configs do (T5 itself has no limit)
    return cfg


def config_json_overrides(c: ModelConfig) -> dict:
    """Keys to write into config.json over T5Config's own: the head's tying as older versions read it."""
    return {"tie_word_embeddings": bool(c.tie_embeddings)}


def untie_head(hm) -> None:
    """Gives an in-memory T5ForConditionalGeneration its own lm_head (what from_pretrained does for an
    untied checkpoint; a model built from a T5Config in transformers 5 shares it with the embedding)."""
    import torch.nn as nn
    if hm.lm_head.weight is hm.shared.weight:
        hm.lm_head.weight = nn.Parameter(hm.shared.weight.detach().clone())


def _unsupported(field: str, got, why: str) -> ValueError:
    return ValueError(f"{field}={got!r} is not supported ({why})")


def model_config_from_hf(h) -> ModelConfig:
    """A T5Config or MT5Config -> ModelConfig(arch="t5"); ValueError names the first field we cannot represent."""
    if h.model_type not in ("t5", "mt5"):             # mT5 is T5 v1.1's layout with a larger vocabulary
        raise _unsupported("model_type", h.model_type, "t5, mt5, pegasus or marian; umt5/longt5 have other layouts")
    if getattr(h, "feed_forward_proj", None) != "gated-gelu":
        raise _unsupported("feed_forward_proj", getattr(h, "feed_forward_proj", None),
                           "model.arch=t5 is T5 v1.1's gated-gelu; the original T5's relu FFN is not built")
    if not getattr(h, "is_encoder_decoder", True):
        raise _unsupported("is_encoder_decoder", h.is_encoder_decoder, "an encoder-decoder is needed")
    start = getattr(h, "decoder_start_token_id", None)
    # transformers 5 keeps the head's tying in scale_decoder_outputs (T5); MT5 never rescales: untied head
    tied = h.model_type == "t5" and bool(getattr(h, "scale_decoder_outputs", getattr(h, "tie_word_embeddings", True)))
    if isinstance(h.eos_token_id, (list, tuple)):
        raise _unsupported("eos_token_id", h.eos_token_id, "one end-of-sequence id")
    # norm and activation are the seed Transformer's settings (t5 is always pre-RMS-norm, gated GELU): defaults
    return ModelConfig(arch="t5", vocab_size=h.vocab_size, real_vocab_size=h.vocab_size, vocab_multiple=h.vocab_size,
                       d_model=h.d_model, n_heads=h.num_heads, head_dim=h.d_kv, d_ff=h.d_ff,
                       n_encoder_layers=h.num_layers, n_decoder_layers=h.num_decoder_layers,
                       dropout=float(h.dropout_rate),
                       max_positions=int(getattr(h, "n_positions", 512) or 512), layer_norm_eps=h.layer_norm_epsilon,
                       pad_id=h.pad_token_id, eos_id=h.eos_token_id,
                       decoder_start_id=h.pad_token_id if start is None else start,
                       relative_attention_num_buckets=h.relative_attention_num_buckets,
                       relative_attention_max_distance=h.relative_attention_max_distance, tie_embeddings=tied)
