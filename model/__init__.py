from model.transformer import ModelConfig, Transformer, count_parameters, padded_vocab, sinusoid_table

__all__ = ["ModelConfig", "Transformer", "count_parameters", "padded_vocab", "sinusoid_table"]
