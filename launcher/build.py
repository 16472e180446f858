"""Builders shared by training, evaluation and conversion: model, optimizer, data stream, DeepSpeed config."""
from __future__ import annotations

import dataclasses

import torch

from data.stream import DataStream, StreamSpec
from data.tokenizer import load_tokenizer, num_sentinels
from launcher.config import ConfigError, RunConfig
from launcher.schedule import lr_multiplier
from model.transformer import ModelConfig, Transformer, padded_vocab


def tokenizer_path(cfg: RunConfig) -> str:
    """data.tokenizer, else the tokenizer.json of data.train or of the first local mixture source."""
    from data.mixture import find_tokenizer
    from data.sources import DataError
    try:
        return find_tokenizer(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None


def model_config(cfg: RunConfig, vocab: int) -> ModelConfig:
    """Fills the vocabulary sizes: padded to model.vocab_multiple and to a multiple of tp."""
    m = cfg.model
    mult = m.vocab_multiple * cfg.parallel.tp // _gcd(m.vocab_multiple, cfg.parallel.tp)
    return dataclasses.replace(m, real_vocab_size=vocab, vocab_size=padded_vocab(vocab, mult))


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def build_model(cfg: RunConfig) -> tuple[Transformer, str]:
    path = tokenizer_path(cfg)
    tok = load_tokenizer(path)
    mc = model_config(cfg, tok.get_vocab_size())
    cfg.model = mc                                   # the effective config records the sizes used
    model = Transformer(mc)
    model.criterion.label_smoothing = cfg.train.label_smoothing
    return model, path


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: str):
    """AdamW (no decay on biases, norms, embeddings) and the LR schedule as a LambdaLR."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio))
    return opt, sched


def ds_config(cfg: RunConfig, accum: int) -> dict:
    """DeepSpeed runs in fp32 (master weights and gradients); bf16 comes from torch.autocast."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # without ZeRO the trainer clips itself (to report the norm); ZeRO optimizers clip here
        "gradient_clipping": cfg.optim.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def build_stream(cfg: RunConfig, spec_path: str, dp_rank: int, dp: int, shuffle: bool,
                 global_batch: int | None = None) -> DataStream:
    """The data stream of one data-parallel rank: spec_path (data.train / data.valid), or data.mixture."""
    from data.mixture import components_for, find_tokenizer
    d = cfg.data
    components = components_for(d, spec_path, shuffle)
    tok = load_tokenizer(find_tokenizer(d))
    spec = StreamSpec(components=components, num_streams=d.num_streams, shuffle_block=d.shuffle_block, seed=d.seed,
                      global_batch=global_batch or cfg.train.global_batch_size, max_src_len=d.max_src_len,
                      max_tgt_len=d.max_tgt_len, noise_density=d.noise_density, mean_span_length=d.mean_span_length,
                      n_sentinels=num_sentinels(tok), shuffle=shuffle, pack=d.pack, bucket_window=d.bucket_window,
                      max_bad_samples=d.max_bad_samples)
    return DataStream(spec, dp_rank, dp, cfg.train.micro_batch_size, d.num_workers)
