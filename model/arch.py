"""What the rest of encdec needs to know about an architecture, in one object (registered in model/registry.py).

An Architecture owns:
    config      its config class (a ModelConfig subclass: the shared settings + its own, and its checks)
    model       its nn.Module class: built on the meta device without initialising anything;
                init_weights() initialises parameters and buffers (construction elsewhere does both)
    hf          its Hugging Face adapter (model/hf_base.py: key map and config both ways, tying, folder checks)
    tp_plan     its tensor-parallel plan as data (TPPlan), applied from outside by launcher/parallel/plan.py
    activation_terms, attention_width, ffn_matrices
                what the planner and the FLOP counter need (launcher/planner, launcher/monitor/flops.py)
    describe    one line for the model card
    document_attention
                whether packed examples may carry per-document encoder masks (data.pack_attention)
Nothing outside the registry and the architecture's own files asks which architecture a config is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ShardedBlock:
    """A module class whose linear children split over the TP ranks, Megatron style.

    columns: children split by output features (weight dim 0, bias dim 0; their outputs are this
    rank's heads / hidden columns); rows: children split by input features (weight dim 1, the
    output all-reduced, the bias added once after); head_tables: embeddings whose columns are
    heads (split along dim 1). The module's replicated inputs (its first `inputs` arguments: 2 for
    attention's x and kv, 1 for a feed-forward's x) are copied into the TP region once for all its
    column children; modules whose name ends with one of `kv_copied_upstream` get kv already copied
    (cross-attention reads the encoder output, copied once for every layer). `dropout` names the
    attribute holding the dropout probability inside the sharded region (a float or nn.Dropout):
    when > 0 the module runs on a private RNG stream per TP rank.
    """
    cls: type
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    head_tables: tuple[str, ...] = ()
    inputs: int = 1
    kv_copied_upstream: tuple[str, ...] = ()
    dropout: str = "dropout"


@dataclass(frozen=True)
class TPPlan:
    """The whole tensor-parallel plan of an architecture (see launcher/parallel/plan.py).

    blocks: the sharded module classes; embedding: the (tied) token embedding, split by vocabulary
    rows; vocab_heads: untied output projections (nn.Linear over the vocabulary), split by rows;
    vocab_buffers: (V,) buffers sliced to this rank's vocabulary rows; copied_outputs: modules whose
    (replicated) output enters sharded weights downstream (encoder output -> cross-attention k/v,
    decoder output -> output projection). The criterion becomes vocabulary-parallel.
    """
    blocks: tuple[ShardedBlock, ...]
    embedding: str = "embed"
    vocab_heads: tuple[str, ...] = ()
    vocab_buffers: tuple[str, ...] = ()
    copied_outputs: tuple[str, ...] = ("encoder_norm", "decoder_norm")

    def shard_dims(self, model: nn.Module) -> dict[str, int]:
        """State-dict key -> dimension split across TP ranks (keys not listed are replicated).
        The same before and after the plan is applied (module paths do not change)."""
        dims = {f"{self.embedding}.weight": 0}
        for name in self.vocab_heads:
            if getattr(model, name, None) is not None:
                dims[f"{name}.weight"] = 0
        for path, m in model.named_modules():
            prefix = f"{path}." if path else ""
            for blk in self.blocks:
                if not isinstance(m, blk.cls):
                    continue
                for child in blk.columns:
                    dims[f"{prefix}{child}.weight"] = 0
                    if getattr(getattr(m, child), "bias", None) is not None:
                        dims[f"{prefix}{child}.bias"] = 0
                for child in blk.rows:
                    dims[f"{prefix}{child}.weight"] = 1
                for child in blk.head_tables:
                    if hasattr(m, child):
                        dims[f"{prefix}{child}.weight"] = 1
        return dims


@dataclass(frozen=True)
class Architecture:
    name: str
    config: type
    model: type
    hf: Any                                   # a model.hf_base.HFAdapter
    tp_plan: TPPlan
    activation_terms: Callable                # (c, B, S, T, tp, bf16) -> (encoder layer, decoder layer, fixed) bytes
    attention_width: Callable                 # c -> H x head width (the q/k/v/o inner width)
    describe: Callable                        # c -> one line for the model card
    ffn_matrices: int = 2                     # d_model x d_ff matrices per feed-forward
    document_attention: bool = False
    meta: dict = field(default_factory=dict)  # free-form notes (what it refuses, references)

    def build(self, c, device: str | torch.device | None = None) -> nn.Module:
        """The model of config c on `device` (default: torch's current default device): on the meta
        device uninitialised (shapes only, no memory), elsewhere with its parameters and buffers
        initialised. A meta model is materialised with to_empty(device=...) and init_weights()."""
        with torch.device(device if device is not None else torch.get_default_device()):
            return self.model(c)

    def count_parameters(self, c) -> int:
        """Parameters of config c (a tied embedding counted once), from the meta model."""
        return sum(p.numel() for p in self.build(c, "meta").parameters())


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim); built on the meta device without its default initialisation (normal_
    on meta tensors costs a second of imports, and init_weights() sets every value anyway)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)
