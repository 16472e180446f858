"""The models encdec trains: one file per architecture, found by name through model/registry.py."""
from model.config import ModelConfig, padded_vocab
from model.registry import ARCHS, arch_of, build, count_parameters, for_hf_model_type, get, make_config

__all__ = ["ARCHS", "ModelConfig", "arch_of", "build", "count_parameters", "for_hf_model_type", "get",
           "make_config", "padded_vocab"]
