from model import hf_adapter as seed_adapter
from model import t5_hf
from model.t5 import T5
from model.t5 import count_parameters as count_t5
from model.transformer import ModelConfig, Transformer, padded_vocab, sinusoid_table
from model.transformer import count_parameters as _count_transformer

ARCHS = ("transformer", "t5")


def build(c: ModelConfig):
    """The model of c.arch: Transformer (the seed model) or T5 (model/t5.py)."""
    if c.arch == "t5":
        return T5(c)
    if c.arch != "transformer":
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, got {c.arch!r}")
    return Transformer(c)


def count_parameters(c: ModelConfig) -> int:
    if c.arch == "t5":
        return count_t5(c)
    return _count_transformer(c)


def hf_adapter_for(c: ModelConfig):
    """The module holding the explicit Hugging Face key map of c.arch (same functions in both):
    model.hf_adapter (Pegasus / Marian) or model.t5_hf (T5ForConditionalGeneration)."""
    if c.arch == "t5":
        return t5_hf
    return seed_adapter


def check_model_config(c: ModelConfig) -> list[tuple[str, str]]:
    """[(key, problem)] for values the model cannot be built with (empty when fine)."""
    bad = []
    if c.arch not in ARCHS:
        bad.append(("model.arch", f"must be one of {', '.join(ARCHS)}, got {c.arch!r}"))
    if c.arch == "t5":
        if c.head_dim < 0:
            bad.append(("model.head_dim", f"must be >= 0, got {c.head_dim}"))
        if not c.head_dim and (c.n_heads <= 0 or c.d_model % c.n_heads):
            bad.append(("model.n_heads", f"{c.n_heads} heads do not divide model.d_model={c.d_model} "
                                         "(or set model.head_dim)"))
        if c.norm != "pre":
            bad.append(("model.norm", f"t5 is pre-norm only, got {c.norm!r}"))
        if c.relative_attention_num_buckets < 4 or c.relative_attention_num_buckets % 2:
            bad.append(("model.relative_attention_num_buckets",
                        f"must be an even number >= 4, got {c.relative_attention_num_buckets}"))
        if c.relative_attention_max_distance <= c.relative_attention_num_buckets // 4:
            bad.append(("model.relative_attention_max_distance",
                        f"must exceed relative_attention_num_buckets / 4, got {c.relative_attention_max_distance}"))
    elif c.head_dim or c.tie_embeddings:
        bad.append(("model.head_dim" if c.head_dim else "model.tie_embeddings",
                    "is a t5 setting (model.arch=t5); the transformer derives head_dim and always ties"))
    return bad


__all__ = ["ARCHS", "ModelConfig", "Transformer", "build", "check_model_config", "count_parameters", "hf_adapter_for",
           "padded_vocab", "sinusoid_table"]
