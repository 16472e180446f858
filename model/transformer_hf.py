"""The Hugging Face adapter of the seed Transformer (model/transformer.py).

pre-LN  -> PegasusForConditionalGeneration (pre-LN, sinusoidal positions sin|cos halves, final LayerNorms)
post-LN -> MarianMTModel                   (post-LN, the same sinusoids, no final LayerNorms)
Both scale embeddings by sqrt(d_model), tie input/output embeddings and add final_logits_bias.
"""
from __future__ import annotations

import torch

from model.hf_base import HFAdapter
from model.transformer import TransformerConfig, sinusoid_table, vocab_logits_bias

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_ENC_BLOCK = {"self_attn": "self_attn", "attn_block.norm": "self_attn_layer_norm", "ffn.fc1": "fc1",
              "ffn.fc2": "fc2", "ffn_block.norm": "final_layer_norm"}
_DEC_BLOCK = {"self_attn": "self_attn", "cross_attn": "encoder_attn", "self_block.norm": "self_attn_layer_norm",
              "cross_block.norm": "encoder_attn_layer_norm", "ffn.fc1": "fc1", "ffn.fc2": "fc2",
              "ffn_block.norm": "final_layer_norm"}
# Hugging Face tensors that are not parameters of ours: fixed tables we recompute, tied copies.
HF_FIXED = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight", "final_logits_bias")
HF_TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _real_vocab(bias: torch.Tensor, where: str) -> int:
    """final_logits_bias (1, V): zeros, then (optionally) <= -1e8 on padding rows -> the real vocabulary."""
    b = bias.reshape(-1)
    nz = (b != 0).nonzero()
    r = int(nz[0]) if len(nz) else b.numel()
    if not bool((b[r:] <= -1e8).all()):
        raise ValueError(f"{where}: final_logits_bias holds trained values; this model has no output bias "
                         f"(only 0 on the vocabulary and -1e9 on padding rows are supported)")
    return r


class PegasusMarian(HFAdapter):
    model_types = ("pegasus", "marian")

    def class_name(self, c: TransformerConfig) -> str:
        return "PegasusForConditionalGeneration" if c.norm == "pre" else "MarianMTModel"

    def key_map(self, c: TransformerConfig) -> dict[str, str]:
        keys = {"embed.weight": "model.shared.weight"}
        for side, n_layers, block in (("encoder", c.n_encoder_layers, _ENC_BLOCK),
                                      ("decoder", c.n_decoder_layers, _DEC_BLOCK)):
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

    def fixed_tensors(self, c: TransformerConfig) -> dict[str, torch.Tensor]:
        pos = sinusoid_table(c.max_positions, c.d_model)
        return {"model.encoder.embed_positions.weight": pos, "model.decoder.embed_positions.weight": pos.clone(),
                "final_logits_bias": vocab_logits_bias(c)[None, :c.hf_vocab_size]}

    def fixed_names(self, c) -> tuple[str, ...]:
        return HF_FIXED

    def tied(self, c) -> tuple[str, ...]:
        return HF_TIED

    def hf_config(self, c: TransformerConfig, max_length: int = 256):
        if abs(c.layer_norm_eps - 1e-5) > 1e-12:
            raise ValueError(f"model.layer_norm_eps={c.layer_norm_eps}: the Hugging Face classes use 1e-5")
        V = c.hf_vocab_size
        common = dict(vocab_size=V, d_model=c.d_model, encoder_layers=c.n_encoder_layers,
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
        return MarianConfig(decoder_vocab_size=V, share_encoder_decoder_embeddings=True, **common)

    def model_config(self, h) -> TransformerConfig:
        checks = [("scale_embedding", True), ("tie_word_embeddings", True),
                  ("decoder_attention_heads", h.encoder_attention_heads), ("decoder_ffn_dim", h.encoder_ffn_dim)]
        if h.model_type == "marian":
            checks += [("share_encoder_decoder_embeddings", True), ("decoder_vocab_size", h.vocab_size)]
        for key, want in checks:
            got = getattr(h, key, want)
            if got != want and not (key == "decoder_vocab_size" and got is None):
                raise ValueError(f"{key}={got!r} is not supported (needs {want!r})")
        return TransformerConfig(vocab_size=h.vocab_size, real_vocab_size=h.vocab_size, d_model=h.d_model,
                                 n_heads=h.encoder_attention_heads, d_ff=h.encoder_ffn_dim,
                                 n_encoder_layers=h.encoder_layers, n_decoder_layers=h.decoder_layers,
                                 norm="pre" if h.model_type == "pegasus" else "post",
                                 activation=h.activation_function, dropout=h.dropout,
                                 attention_dropout=h.attention_dropout, max_positions=h.max_position_embeddings,
                                 pad_id=h.pad_token_id, eos_id=h.eos_token_id,
                                 decoder_start_id=h.decoder_start_token_id)

    def check_folder(self, where, hcfg, mc: TransformerConfig, names, tensor) -> TransformerConfig:
        """A trained final_logits_bias, untied embeddings or position tables other than the sinusoids are refused."""
        if "final_logits_bias" in names:
            mc.real_vocab_size = _real_vocab(tensor("final_logits_bias"), where)
        shared = tensor("model.shared.weight") if "model.shared.weight" in names else None
        table = sinusoid_table(mc.max_positions, mc.d_model)
        for k in names:
            if k in HF_TIED and shared is not None and not torch.equal(tensor(k), shared):
                raise ValueError(f"{where}: {k} differs from model.shared.weight (untied embeddings)")
            if "embed_positions" in k and not torch.equal(tensor(k).float(), table):
                raise ValueError(f"{where}: {k} is not the sinusoid table of {mc.max_positions} x {mc.d_model}")
        return mc


ADAPTER = PegasusMarian()
