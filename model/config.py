"""The model settings every architecture shares; each architecture adds its own in a subclass
(model/transformer.py TransformerConfig, model/t5.py T5Config, ...), chosen by `arch`.

The vocabulary has two sizes: real_vocab_size, the tokenizer's, and vocab_size, the embedding's
rows, padded up to a multiple of vocab_multiple (and of the tensor-parallel degree) so matmuls and
TP shards split evenly. Padded rows are never input and never predicted. export_vocab_size is the
row count an exported Hugging Face folder gets (0 = vocab_size): a model imported from a folder
whose vocabulary is not a multiple of vocab_multiple is padded on load and cut back on export.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# settings a run may change when it continues from a checkpoint (they do not change the function's shape)
MUTABLE = ("vocab_size", "vocab_multiple", "export_vocab_size", "dropout", "attention_dropout", "activation_dropout")


@dataclass
class ModelConfig:
    arch: str = "transformer"    # the registry's name of the architecture (model/registry.py)
    vocab_size: int = 0          # padded size (embedding rows); 0 = set from the tokenizer
    real_vocab_size: int = 0     # tokenizer size; ids >= this are never predicted
    vocab_multiple: int = 128    # pad the embedding to a multiple of this (and of TP)
    export_vocab_size: int = 0   # rows of an exported Hugging Face embedding; 0 = vocab_size
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1         # embeddings, residual branches
    max_positions: int = 1024
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0    # the decoder input starts with <pad>, as in Pegasus, Marian and T5
    forced_bos_id: int = -1      # the first generated token, forced (HF forced_bos_token_id: BART's <s>); -1 = none
    forced_eos_id: int = -1      # the last token when generation reaches its length (HF forced_eos_token_id); -1 = none

    def check(self) -> list[tuple[str, str]]:
        """[(key, problem)] for values no architecture can be built with; subclasses add theirs."""
        bad = []
        if self.d_model <= 0:
            bad.append(("model.d_model", f"must be > 0, got {self.d_model}"))
        if self.n_encoder_layers <= 0 or self.n_decoder_layers <= 0:
            bad.append(("model.n_encoder_layers", "encoder and decoder need at least one layer"))
        if not 0 <= self.dropout < 1:
            bad.append(("model.dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.export_vocab_size < 0:
            bad.append(("model.export_vocab_size", f"must be >= 0, got {self.export_vocab_size}"))
        return bad

    def identity(self) -> dict:
        """The settings that fix the function a checkpoint computes (what resuming must agree on)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in MUTABLE}

    @property
    def hf_vocab_size(self) -> int:
        """Embedding rows of an exported Hugging Face folder."""
        return self.export_vocab_size or self.vocab_size


def padded_vocab(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def heads_divide(c: ModelConfig) -> list[tuple[str, str]]:
    """The check of architectures whose head width is d_model / n_heads."""
    if c.n_heads <= 0 or c.d_model % c.n_heads:
        return [("model.n_heads", f"{c.n_heads} heads do not divide model.d_model={c.d_model}")]
    return []
