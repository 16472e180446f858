"""A run's inputs, resolved once per start: data sources, manifests, the tokenizer and the vocabulary.

resolve_inputs(cfg) finds every shard and manifest of data.train / data.mixture and data.valid
(one clear error if any is missing), finds the tokenizer and fills the model's vocabulary sizes
into cfg.model (so the config saved in the run folder and in every checkpoint is complete).
The streams of training and evaluation are then built from these resolved parts, never again
from the config's paths.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from data.mixture import Component, check_data, find_tokenizer
from data.sources import DataError
from data.stream import DataStream
from data.spec import StreamSpec
from data.ul2 import mode_ids, parse_table
from data.tokenizer import load_tokenizer, sentinel_ids
from launcher.config import ConfigError, RunConfig
from model import ModelConfig, padded_vocab


@dataclass
class Inputs:
    tokenizer_path: str
    vocab: int                      # tokenizer size (the real vocabulary)
    n_sentinels: int
    train: list[Component]
    valid: list[Component] | None   # None: no evaluation data
    sentinel_ids: list = dataclasses.field(default_factory=list)   # the tokenizer's <extra_id_0>, ... ids
    ul2_modes: list = dataclasses.field(default_factory=list)      # data.ul2's mode token ids (-1: none)

    def stream(self, cfg: RunConfig, which: str, dp_rank: int, dp: int, global_batch: int | None = None
               ) -> DataStream:
        """The data stream of one data-parallel rank: which = "train" (shuffled) or "valid" (in order)."""
        d, shuffle = cfg.data, which == "train"
        components = self.train if shuffle else self.valid
        if components is None:
            raise ConfigError("config key 'data.valid': no validation data given")
        spec = StreamSpec(components=components, num_streams=d.num_streams, shuffle_block=d.shuffle_block,
                          seed=d.seed, global_batch=global_batch or cfg.train.global_batch_size,
                          max_src_len=d.max_src_len, max_tgt_len=d.max_tgt_len, noise_density=d.noise_density,
                          mean_span_length=d.mean_span_length, n_sentinels=self.n_sentinels,
                          sentinel_ids=self.sentinel_ids, ul2=d.ul2, ul2_modes=self.ul2_modes, shuffle=shuffle,
                          pack=d.pack, bucket_window=d.bucket_window, max_bad_samples=d.max_bad_samples,
                          vocab_size=self.vocab, pack_attention=d.pack_attention)
        return DataStream(spec, dp_rank, dp, cfg.train.micro_batch_size, d.num_workers)


def model_config(cfg: RunConfig, vocab: int) -> ModelConfig:
    """The vocabulary sizes filled in: padded to model.vocab_multiple and to a multiple of tp."""
    m = cfg.model
    mult = math.lcm(m.vocab_multiple, cfg.parallel.tp)
    return dataclasses.replace(m, real_vocab_size=vocab, vocab_size=padded_vocab(vocab, mult))


def resolve_inputs(cfg: RunConfig) -> Inputs:
    """Resolves every source and the tokenizer (errors name the key or file); fills cfg.model's vocabulary."""
    train, valid = check_data(cfg.data)
    try:
        tok_path = find_tokenizer(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    tok = load_tokenizer(tok_path)
    cfg.model = model_config(cfg, tok.get_vocab_size())
    modes = []
    if any(c.objective == "ul2" for c in train + (valid or [])):
        try:
            modes = mode_ids(parse_table(cfg.data.ul2), tok.token_to_id)
        except DataError as e:
            raise ConfigError(f"{e} ({tok_path})") from None
    ids = sentinel_ids(tok)
    return Inputs(tokenizer_path=tok_path, vocab=tok.get_vocab_size(), n_sentinels=len(ids),
                  train=train, valid=valid, sentinel_ids=ids, ul2_modes=modes)
