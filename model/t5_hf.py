"""The explicit key map between model/t5.py and Hugging Face's T5ForConditionalGeneration.

The interface of model/hf_base.py, for model.arch=t5. T5 has no fixed tensors (no position tables,
no final_logits_bias); its embed_tokens are aliases of shared.weight, and so is lm_head.weight
when the head is tied (original T5).

transformers 5 note: T5Config always reports tie_word_embeddings=True and keeps the untied-head
information as scale_decoder_outputs (False for v1.1). An untied lm_head is loaded untied by
from_pretrained (it differs from shared.weight; transformers logs that it does not tie them).
The exported config.json records tie_word_embeddings as it is, for every transformers version.
"""
from __future__ import annotations

import torch

from model.hf_base import HFAdapter
from model.t5 import T5Config, head_dim

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


def _unsupported(field: str, got, why: str) -> ValueError:
    return ValueError(f"{field}={got!r} is not supported ({why})")


class T5Adapter(HFAdapter):
    model_types = ("t5", "mt5")             # mT5 is T5 v1.1's layout with a larger vocabulary

    def class_name(self, c: T5Config) -> str:
        return "T5ForConditionalGeneration"

    def tied(self, c: T5Config) -> tuple[str, ...]:
        """HF tensors that are copies of shared.weight."""
        return ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + \
            (("lm_head.weight",) if c.tie_embeddings else ())

    def ignored(self, c: T5Config) -> tuple[str, ...]:
        return HF_IGNORED

    def vocab_rows(self, c: T5Config) -> tuple[str, ...]:
        return ("embed.weight",) + (() if c.tie_embeddings else ("lm_head.weight",))

    def key_map(self, c: T5Config) -> dict[str, str]:
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
                    keys[f"{side}.0.self_attn.{BIAS_TABLE}.weight"] = \
                        f"{side}.block.0.layer.0.SelfAttention.{BIAS_TABLE}.weight"
            keys[f"{side}_norm.weight"] = f"{side}.final_layer_norm.weight"
        if not c.tie_embeddings:
            keys["lm_head.weight"] = "lm_head.weight"
        return keys

    def hf_config(self, c: T5Config, max_length: int = 256):
        from transformers import T5Config as HFT5Config
        cfg = HFT5Config(vocab_size=c.hf_vocab_size, d_model=c.d_model, d_kv=head_dim(c),
                         d_ff=c.d_ff, num_layers=c.n_encoder_layers, num_decoder_layers=c.n_decoder_layers,
                         num_heads=c.n_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
                         relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout,
                         layer_norm_epsilon=c.layer_norm_eps, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                         pad_token_id=c.pad_id, eos_token_id=c.eos_id, decoder_start_token_id=c.decoder_start_id,
                         tie_word_embeddings=c.tie_embeddings)
        cfg.n_positions = c.max_positions              # recorded as older T5 configs do (T5 itself has no limit)
        return cfg

    def config_json_overrides(self, c: T5Config) -> dict:
        """The head's tying as older versions read it."""
        return {"tie_word_embeddings": bool(c.tie_embeddings)}

    def model_config(self, h) -> T5Config:
        """A T5Config or MT5Config -> ours; ValueError names the first field we cannot represent."""
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
        return T5Config(vocab_size=h.vocab_size, real_vocab_size=h.vocab_size, vocab_multiple=h.vocab_size,
                        d_model=h.d_model, n_heads=h.num_heads, head_dim=h.d_kv, d_ff=h.d_ff,
                        n_encoder_layers=h.num_layers, n_decoder_layers=h.num_decoder_layers,
                        dropout=float(h.dropout_rate),
                        max_positions=int(getattr(h, "n_positions", 512) or 512), layer_norm_eps=h.layer_norm_epsilon,
                        pad_id=h.pad_token_id, eos_id=h.eos_token_id,
                        decoder_start_id=h.pad_token_id if start is None else start,
                        relative_attention_num_buckets=h.relative_attention_num_buckets,
                        relative_attention_max_distance=h.relative_attention_max_distance, tie_embeddings=tied)

    def check_folder(self, where, hcfg, mc: T5Config, names, tensor) -> T5Config:
        if "shared.weight" not in names:
            raise ValueError(f"{where}: no shared.weight (the token embedding)")
        shared = tensor("shared.weight")
        for k in self.tied(mc):
            if k in names and not torch.equal(tensor(k), shared):
                raise ValueError(f"{where}: {k} differs from shared.weight, but tie_word_embeddings is true "
                                 "(the head's d_model^-0.5 rescale applies to tied heads only)")
        if not mc.tie_embeddings and "lm_head.weight" not in names:
            raise ValueError(f"{where}: tie_word_embeddings=false but the folder has no lm_head.weight")
        return mc


ADAPTER = T5Adapter()
