"""The architectures encdec builds, by name (model.arch). Adding one: a model file (its config
class, module, TP plan, planner terms), an HF adapter, and one entry here.

    get(name)              the Architecture (model/arch.py), or ValueError listing the known names
    arch_of(c)             the Architecture of a config
    make_config(**kw)      a config of the class of kw["arch"] (default transformer)
    build(c, device)       the model (meta: uninitialised shapes; else initialised)
    count_parameters(c)
    for_hf_model_type(t)   the Architecture whose adapter reads a Hugging Face model_type
"""
from __future__ import annotations

import dataclasses

import torch

from model import bart, bart_hf, t5, t5_hf, transformer, transformer_hf
from model.arch import Architecture
from model.config import ModelConfig

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(name="transformer", config=transformer.TransformerConfig, model=transformer.Transformer,
                 hf=transformer_hf.ADAPTER, tp_plan=transformer.TP_PLAN,
                 activation_terms=transformer.activation_terms, attention_width=transformer.attention_width,
                 describe=transformer.describe, document_attention=True),
    Architecture(name="t5", config=t5.T5Config, model=t5.T5, hf=t5_hf.ADAPTER, tp_plan=t5.TP_PLAN,
                 activation_terms=t5.activation_terms, attention_width=t5.attention_width, describe=t5.describe,
                 ffn_matrices=3, document_attention=False,
                 meta={"document_attention": "t5 adds its relative position bias, not built with per-document masks"}),
    Architecture(name="bart", config=bart.BartConfig, model=bart.Bart, hf=bart_hf.ADAPTER, tp_plan=bart.TP_PLAN,
                 activation_terms=bart.activation_terms, attention_width=bart.attention_width,
                 describe=bart.describe, document_attention=False,
                 meta={"document_attention": "bart is not built with per-document masks"}),
)}
ARCHS = tuple(ARCHITECTURES)


def get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, got {name!r}")
    return ARCHITECTURES[name]


def arch_of(c: ModelConfig) -> Architecture:
    return get(c.arch)


def make_config(**kw) -> ModelConfig:
    """The config of architecture kw["arch"] (default "transformer") with these settings."""
    cls = get(kw.get("arch", "transformer")).config
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a setting of model.arch={cls.arch!r}")
    return cls(**kw)


def build(c: ModelConfig, device: str | torch.device | None = None) -> torch.nn.Module:
    return arch_of(c).build(c, device)


def count_parameters(c: ModelConfig) -> int:
    return arch_of(c).count_parameters(c)


def for_hf_model_type(model_type: str) -> Architecture:
    for a in ARCHITECTURES.values():
        if model_type in a.hf.model_types:
            return a
    known = ", ".join(t for a in ARCHITECTURES.values() for t in a.hf.model_types)
    raise ValueError(f"model_type '{model_type}' is not supported ({known})")
