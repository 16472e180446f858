"""The Hugging Face adapter of BART (model/bart.py): BartForConditionalGeneration, facebook/bart-* folders.

The layers carry the names Marian and Pegasus inherited from BART (model/transformer_hf.py's block
maps); BART adds a learned position table per stack (P + 2 rows, stored whole: the two rows before
position 0 round-trip untouched) and a layernorm_embedding per stack. Tied lm_head and embed_tokens,
final_logits_bias = 0 on the vocabulary (-1e9 on padded rows, as the seed exports it).

Decoding conventions travel with the config: facebook/bart-* start the decoder with </s>
(decoder_start_token_id=2), force <s> as the first generated token (forced_bos_token_id=0, in
config.json for transformers 4, generation_config.json for 5) and </s> at the length limit
(forced_eos_token_id=2): model.decoder_start_id, forced_bos_id and forced_eos_id hold them, greedy
decoding honours them and an export writes them back (config.json, generation_config.json). A BART
trained by encdec starts with <pad> like every encdec model (the data's decoder inputs do) and
forces nothing. mBART's pre-LN / final LayerNorm variants are refused.
"""
from __future__ import annotations

import json
import os

import torch

from model.bart import POSITION_OFFSET, BartConfig
from model.hf_base import HFAdapter
from model.transformer import vocab_logits_bias
from model.transformer_hf import _ATTN, _DEC_BLOCK, _ENC_BLOCK, HF_TIED, _real_vocab

# config.json keys of older BART configs (transformers 3-4) that change the function, and the value BART has
_LEGACY = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True,
           "static_position_embeddings": False, "add_bias_logits": False, "extra_pos_embeddings": POSITION_OFFSET}


def _unsupported(key, got, why: str) -> ValueError:
    return ValueError(f"{key}={got!r} is not supported ({why})")


def _generation_value(where: str, key: str):
    """A generation setting as transformers' from_pretrained sees it: generation_config.json when the
    folder has one, else config.json (transformers 5 drops such keys from the config object)."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(where, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f).get(key)
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{path}: {e}") from None
    return None


class BartAdapter(HFAdapter):
    model_types = ("bart",)

    def class_name(self, c: BartConfig) -> str:
        return "BartForConditionalGeneration"

    def key_map(self, c: BartConfig) -> dict[str, str]:
        keys = {"embed.weight": "model.shared.weight"}
        for side, n_layers, block in (("encoder", c.n_encoder_layers, _ENC_BLOCK),
                                      ("decoder", c.n_decoder_layers, _DEC_BLOCK)):
            for i in range(n_layers):
                for ours, theirs in block.items():
                    for a, b in (_ATTN.items() if ours.endswith("attn") else [("", "")]):
                        for p in ("weight", "bias"):
                            o, t = (f"{ours}.{a}", f"{theirs}.{b}") if a else (ours, theirs)
                            keys[f"{side}.{i}.{o}.{p}"] = f"model.{side}.layers.{i}.{t}.{p}"
            keys[f"{side}_positions.weight"] = f"model.{side}.embed_positions.weight"
            for p in ("weight", "bias"):
                keys[f"{side}_embed_norm.{p}"] = f"model.{side}.layernorm_embedding.{p}"
        return keys

    def fixed_tensors(self, c: BartConfig) -> dict[str, torch.Tensor]:
        return {"final_logits_bias": vocab_logits_bias(c)[None, :c.hf_vocab_size]}

    def tied(self, c) -> tuple[str, ...]:
        return HF_TIED

    def ignored(self, c) -> tuple[str, ...]:
        return ("model.encoder.version", "model.decoder.version")      # fairseq leftovers transformers skips

    def hf_config(self, c: BartConfig, max_length: int = 256):
        from transformers import BartConfig as HFBartConfig
        if abs(c.layer_norm_eps - 1e-5) > 1e-12:
            raise ValueError(f"model.layer_norm_eps={c.layer_norm_eps}: BartForConditionalGeneration uses 1e-5")
        forced = c.forced_bos_id if c.forced_bos_id >= 0 else None
        return HFBartConfig(vocab_size=c.hf_vocab_size, d_model=c.d_model, encoder_layers=c.n_encoder_layers,
                            decoder_layers=c.n_decoder_layers, encoder_attention_heads=c.n_heads,
                            decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.d_ff, decoder_ffn_dim=c.d_ff,
                            activation_function=c.activation, dropout=c.dropout,
                            attention_dropout=c.attention_dropout, activation_dropout=c.activation_dropout,
                            max_position_embeddings=c.max_positions, scale_embedding=c.scale_embedding,
                            pad_token_id=c.pad_id, eos_token_id=c.eos_id,
                            bos_token_id=c.decoder_start_id if forced is None else forced,
                            decoder_start_token_id=c.decoder_start_id,
                            forced_eos_token_id=c.forced_eos_id if c.forced_eos_id >= 0 else None,
                            tie_word_embeddings=True, is_encoder_decoder=True)

    def config_json_overrides(self, c: BartConfig) -> dict:
        """The forced first token where transformers 4 reads it (5 reads generation_config.json)."""
        return {"forced_bos_token_id": c.forced_bos_id} if c.forced_bos_id >= 0 else {}

    def model_config(self, h) -> BartConfig:
        """A BartConfig -> ours; ValueError names the first field we cannot represent."""
        for key, want in _LEGACY.items():
            got = getattr(h, key, want)
            if got != want:
                raise _unsupported(key, got, f"BART has {key}={want!r}; mBART-style layouts are not built")
        checks = [("tie_word_embeddings", True), ("decoder_attention_heads", h.encoder_attention_heads),
                  ("decoder_ffn_dim", h.encoder_ffn_dim), ("is_encoder_decoder", True)]
        for key, want in checks:
            got = getattr(h, key, want)
            if got != want:
                raise _unsupported(key, got, f"needs {want!r}")
        if h.activation_function not in ("gelu", "relu"):
            raise _unsupported("activation_function", h.activation_function, "gelu or relu")
        if isinstance(h.eos_token_id, (list, tuple)):
            raise _unsupported("eos_token_id", h.eos_token_id, "one end-of-sequence id")
        start, forced_eos = h.decoder_start_token_id, getattr(h, "forced_eos_token_id", None)
        if forced_eos is not None and not isinstance(forced_eos, int):
            raise _unsupported("forced_eos_token_id", forced_eos, "one token id")
        return BartConfig(vocab_size=h.vocab_size, real_vocab_size=h.vocab_size, d_model=h.d_model,
                          n_heads=h.encoder_attention_heads, d_ff=h.encoder_ffn_dim,
                          n_encoder_layers=h.encoder_layers, n_decoder_layers=h.decoder_layers,
                          activation=h.activation_function, dropout=float(h.dropout),
                          attention_dropout=float(h.attention_dropout), activation_dropout=float(h.activation_dropout),
                          max_positions=h.max_position_embeddings, scale_embedding=bool(h.scale_embedding),
                          pad_id=h.pad_token_id, eos_id=h.eos_token_id,
                          decoder_start_id=h.eos_token_id if start is None else start,
                          forced_eos_id=-1 if forced_eos is None else forced_eos)

    def check_folder(self, where, hcfg, mc: BartConfig, names, tensor) -> BartConfig:
        """The forced first token (generation_config.json or config.json); a trained final_logits_bias,
        untied embeddings or position tables of another size are refused."""
        forced = _generation_value(where, "forced_bos_token_id")
        if forced is not None and not isinstance(forced, int):
            raise ValueError(f"{where}: forced_bos_token_id={forced!r} is not supported (one token id)")
        mc.forced_bos_id = -1 if forced is None else forced
        if "final_logits_bias" in names:
            mc.real_vocab_size = _real_vocab(tensor("final_logits_bias"), where)
        shared = tensor("model.shared.weight") if "model.shared.weight" in names else None
        for k in names:
            if k in HF_TIED and shared is not None and not torch.equal(tensor(k), shared):
                raise ValueError(f"{where}: {k} differs from model.shared.weight (untied embeddings)")
            if k.endswith("embed_positions.weight") and tensor(k).shape[0] != mc.max_positions + POSITION_OFFSET:
                raise ValueError(f"{where}: {k} has {tensor(k).shape[0]} rows, max_position_embeddings="
                                 f"{mc.max_positions} needs {mc.max_positions + POSITION_OFFSET}")
        return mc


ADAPTER = BartAdapter()
