"""The explicit key map between model/t5.py and Hugging Face's T5ForConditionalGeneration.

The interface of model/hf_base.py, for model.arch=t5. T5 has no fixed tensors (no position tables,
no final_logits_bias); its embed_tokens are aliases of shared.weight, and so is lm_head.weight
when the head is tied (original T5).

What T5 calls a tied head is the rescale: the decoder output times d_model^-0.5 before a head
that is shared.weight (original T5). v1.1 neither rescales nor shares. How a folder says which
depends on the transformers version that wrote it, so a folder is read from its config.json as
written and from its tensors (folder_config, check_folder):
    rescaled   config.json scale_decoder_outputs where present (transformers >= 5 writes it; its
               T5Config turns tie_word_embeddings=False into scale_decoder_outputs=False and then
               reports and saves tie_word_embeddings=True with a shared head); else
               tie_word_embeddings as written (absent: true), as transformers 4 reads it. mT5
               rescales as T5 under transformers 4 and never under 5 (transformers_version).
    the head   an lm_head.weight tensor is the head; without one the head is shared.weight.
Rescaled with a shared head (or an lm_head equal to shared.weight) -> tie_embeddings=true; not
rescaled -> tie_embeddings=false, the head our lm_head (a copy of shared.weight when the folder
has none: the same function; training then updates the two apart, as v1.1 does); rescaled with an
lm_head that differs from shared.weight is refused (no such model is built here).
The exported config.json records tie_word_embeddings and scale_decoder_outputs as they are, so
every transformers version reads the head alike (an untied lm_head that differs from shared.weight
is loaded untied by transformers 5 too: it logs that it does not tie them).
"""
from __future__ import annotations

import json
import os

import torch

from model.hf_base import HFAdapter
from model.t5 import T5Config, head_dim

HEAD = "lm_head.weight"
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


def _major(version) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def written_rescale(written: dict) -> tuple[bool, str]:
    """(whether the writer of this config.json meant the head output rescaled by d_model^-0.5, the
    key and value that say so), from the json as written (see the module docstring)."""
    mt = written.get("model_type")
    if mt == "t5" and "scale_decoder_outputs" in written:
        v = written["scale_decoder_outputs"]
        return bool(v), f"scale_decoder_outputs={json.dumps(v)}"
    tie = written.get("tie_word_embeddings", True)
    said = f"tie_word_embeddings={json.dumps(tie)}" if "tie_word_embeddings" in written else \
        "no tie_word_embeddings (true by default)"
    if mt == "mt5" and _major(written.get("transformers_version", "4")) >= 5:
        return False, f"model_type=\"mt5\" written by transformers {written['transformers_version']} (never rescaled)"
    return bool(tie), said


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
        """The head's tying as every version reads it (4: tie_word_embeddings, 5: scale_decoder_outputs)."""
        return {"tie_word_embeddings": bool(c.tie_embeddings), "scale_decoder_outputs": bool(c.tie_embeddings)}

    def model_config(self, h) -> T5Config:
        """A T5Config or MT5Config -> ours; ValueError names the first field we cannot represent."""
        if getattr(h, "feed_forward_proj", None) != "gated-gelu":
            raise _unsupported("feed_forward_proj", getattr(h, "feed_forward_proj", None),
                               "model.arch=t5 is T5 v1.1's gated-gelu; the original T5's relu FFN is not built")
        if not getattr(h, "is_encoder_decoder", True):
            raise _unsupported("is_encoder_decoder", h.is_encoder_decoder, "an encoder-decoder is needed")
        start = getattr(h, "decoder_start_token_id", None)
        # as transformers parsed it (5: scale_decoder_outputs of T5; MT5 never rescales); a folder: folder_config
        tied = h.model_type == "t5" and bool(getattr(h, "scale_decoder_outputs", getattr(h, "tie_word_embeddings", True)))
        if isinstance(h.eos_token_id, (list, tuple)):
            raise _unsupported("eos_token_id", h.eos_token_id, "one end-of-sequence id")
        return T5Config(vocab_size=h.vocab_size, real_vocab_size=h.vocab_size,
                        d_model=h.d_model, n_heads=h.num_heads, head_dim=h.d_kv, d_ff=h.d_ff,
                        n_encoder_layers=h.num_layers, n_decoder_layers=h.num_decoder_layers,
                        dropout=float(h.dropout_rate),
                        max_positions=int(getattr(h, "n_positions", 512) or 512), layer_norm_eps=h.layer_norm_epsilon,
                        pad_id=h.pad_token_id, eos_id=h.eos_token_id,
                        decoder_start_id=h.pad_token_id if start is None else start,
                        relative_attention_num_buckets=h.relative_attention_num_buckets,
                        relative_attention_max_distance=h.relative_attention_max_distance, tie_embeddings=tied)

    def folder_config(self, h, written: dict) -> T5Config:
        """model_config, with the head's rescale as config.json's writer meant it (written_rescale)."""
        mc = self.model_config(h)
        mc.tie_embeddings, _ = written_rescale(written)
        return mc

    def check_folder(self, where, hcfg, mc: T5Config, names, tensor) -> T5Config:
        """The head from the tensors: shared.weight when the folder has no lm_head.weight."""
        if "shared.weight" not in names:
            raise ValueError(f"{where}: no tensor shared.weight (the token embedding)")
        shared = tensor("shared.weight")
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if k in names and not torch.equal(tensor(k), shared):
                raise ValueError(f"{where}: tensor {k} differs from shared.weight (T5 has one input embedding)")
        if mc.tie_embeddings and HEAD in names and not torch.equal(tensor(HEAD), shared):
            try:
                with open(os.path.join(where, "config.json"), encoding="utf-8") as f:
                    said = written_rescale(json.load(f))[1]
            except (OSError, ValueError):
                said = "tie_word_embeddings=true"
            raise ValueError(f"{where}: tensor {HEAD} differs from shared.weight, but config.json has {said}: "
                             "the head output is rescaled by d_model^-0.5 (T5's tied head, shared.weight); a "
                             "rescaled head of its own is not built")
        return mc

    def from_hf_state_dict(self, hf: dict, c: T5Config) -> dict:
        """As the base class; an untied model from a folder without lm_head.weight starts its head
        from shared.weight (the head such a folder computes with)."""
        out = super().from_hf_state_dict(hf, c)
        if not c.tie_embeddings and HEAD not in hf and "shared.weight" in hf:
            out["lm_head.weight"] = hf["shared.weight"]
        return out


ADAPTER = T5Adapter()
