"""A run's inputs, resolved once per start: data sources, manifests, the tokenizer and the vocabulary.

resolve_inputs(cfg) finds every shard and manifest of data.train / data.mixture and data.valid
(one clear error if any is missing; sources without a manifest are scanned, data/scan.py), finds
the tokenizer and fills the model's vocabulary sizes into cfg.model (so the config saved in the
run folder and in every checkpoint is complete). The streams of training and evaluation are then
built from these resolved parts, never again from the config's paths.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from data.mixture import Component
from data.resolve import Where, check_data
from data.sources import DataError
from data.spec import StreamSpec, Vocab, vocab_of
from data.stream import DataStream
from launcher.config import ConfigError, RunConfig
from model import ModelConfig, padded_vocab


@dataclass
class Inputs:
    tokenizer_path: str             # the run's tokenizer.json
    vocab: Vocab                    # its size, sentinel ids, UL2 mode ids
    train: list[Component]
    valid: list[Component] | None   # None: no evaluation data

    def spec(self, cfg: RunConfig, which: str, global_batch: int | None = None) -> StreamSpec:
        """The stream settings of which = "train" (shuffled) or "valid" (in order): the one builder."""
        components = self.train if which == "train" else self.valid
        if components is None:
            raise ConfigError("config key 'data.valid': no validation data given")
        return StreamSpec(cfg.data, components, global_batch or cfg.train.global_batch_size, which == "train",
                          self.vocab)

    def stream(self, cfg: RunConfig, which: str, dp_rank: int, dp: int, global_batch: int | None = None,
               reduce=None) -> DataStream:
        """The data stream of one data-parallel rank; reduce: sums a list of numbers over the
        data-parallel ranks (its counters' totals, DataStream.counters)."""
        return DataStream(self.spec(cfg, which, global_batch), dp_rank, dp, cfg.train.micro_batch_size,
                          cfg.data.num_workers, reduce=reduce)


def model_config(cfg: RunConfig, vocab: int) -> ModelConfig:
    """The vocabulary sizes filled in: padded to model.vocab_multiple and to a multiple of tp."""
    m = cfg.model
    mult = math.lcm(m.vocab_multiple, cfg.parallel.tp)
    return dataclasses.replace(m, real_vocab_size=vocab, vocab_size=padded_vocab(vocab, mult))


def resolve_inputs(cfg: RunConfig, share: tuple[int, int] = (0, 1)) -> Inputs:
    """Resolves every source and the tokenizer (errors name the key or file); fills cfg.model's vocabulary.

    share: (rank, world size) of the processes resolving the same run now (they split a first scan)."""
    where = Where(cfg.data.scan_cache, os.path.join(cfg.out_dir, "data-scan"), share)
    try:
        found = check_data(cfg.data, where)
    except DataError as e:
        if str(e).startswith("config key"):
            raise ConfigError(str(e)) from None
        raise
    try:
        vocab = vocab_of(found.tokenizer, cfg.data)
    except DataError as e:
        raise ConfigError(f"{e} ({found.tokenizer})") from None
    cfg.model = model_config(cfg, vocab.size)
    return Inputs(tokenizer_path=found.tokenizer, vocab=vocab, train=found.train, valid=found.valid)
