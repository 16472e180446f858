"""What a data stream is: its settings (StreamSpec: the run's DataConfig, its datasets, the batch,
the vocabulary) and the sizes of each dataset's epoch (Geometry).

Plain data, so a spec pickles into loader workers; data/reader.py reads one canonical stream of
it and data/stream.py lays the streams out over ranks and workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from data.config import DataConfig, uses
from data.mixture import Component
from data.objectives import raw_length_for
from data.packing import chunks_per_block, mean_doc_tokens
from data.packed import has_index
from data.registry import OBJECTIVES
from data.sources import DataError
from data.tokenizer import load_tokenizer, sentinel_ids, tokenizer_file

log = logging.getLogger("encdec.data")


@dataclass(frozen=True)
class Vocab:
    """What the run's tokenizer decides for a stream (vocab_of): its size (> 0: ids at or above it
    are bad samples), its <extra_id_0>, <extra_id_1>, ... ids, and per objective used the ids it
    needs (Objective.vocab: e.g. the UL2 denoisers' mode token ids, -1 = none) as (name, ids) pairs."""
    size: int
    sentinel_ids: tuple
    ids: tuple = ()

    def of(self, objective: str, default=()):
        return dict(self.ids).get(objective, default)


def vocab_of(tokenizer: str, d: DataConfig) -> Vocab:
    """The tokenizer (a tokenizer.json, a prepared folder or a Hugging Face folder) -> Vocab; what an
    objective needs must be in it (DataError naming the setting otherwise, e.g. data.ul2[i].mode)."""
    tok = load_tokenizer(tokenizer_file(tokenizer))
    ids = [(name, o.vocab(tok, d)) for name, o in OBJECTIVES.items() if uses(d, name)]
    return Vocab(tok.get_vocab_size(), tuple(sentinel_ids(tok)), tuple((n, v) for n, v in ids if v is not None))


@dataclass
class StreamSpec:
    """What a reader needs: the run's data settings, its datasets, the batch and the vocabulary.

    Plain data, so it pickles into loader workers. Every setting is read from `data` (the run's
    DataConfig), so no default here can disagree with the config's.
    """
    data: DataConfig
    components: list                    # mixture.Component, one per dataset
    global_batch: int
    shuffle: bool                       # False: validation (one ordered pass)
    vocab: Vocab

    num_streams = property(lambda self: self.data.num_streams)
    shuffle_block = property(lambda self: self.data.shuffle_block)
    seed = property(lambda self: self.data.seed)
    max_src_len = property(lambda self: self.data.max_src_len)
    max_tgt_len = property(lambda self: self.data.max_tgt_len)
    noise_density = property(lambda self: self.data.noise_density)
    mean_span_length = property(lambda self: self.data.mean_span_length)
    pack = property(lambda self: self.data.pack)
    pack_attention = property(lambda self: self.data.pack_attention)
    max_bad_samples = property(lambda self: self.data.max_bad_samples)
    bucket_window = property(lambda self: self.data.bucket_window if self.shuffle else 0)
    vocab_size = property(lambda self: self.vocab.size)

    def __post_init__(self):
        if not self.components:
            raise DataError("no shards given")
        if len(self.components) > 1 and self.global_batch % self.num_streams:
            raise DataError(f"a mixture needs the global batch ({self.global_batch}) to be a multiple of "
                            f"data.num_streams={self.num_streams}")
        if len(self.components) > 1 and not self.shuffle:
            raise DataError("validation data must be a single dataset, not a mixture")
        self.sentinels = list(self.vocab.sentinel_ids)
        if any(OBJECTIVES[c.objective].needs_sentinels for c in self.components) and not self.sentinels:
            raise DataError("span corruption needs sentinel tokens, and the tokenizer has none "
                            "(no <extra_id_0>; use one with <extra_id_N> tokens, e.g. one `encdec prepare` trains)")
        # span corruption's chunk length: the raw tokens whose corrupted input fills data.max_src_len
        self.raw_len = raw_length_for(self.max_src_len, self.noise_density, self.mean_span_length)
        self.objectives = {}                           # name -> the objective resolved against this spec
        for c in self.components:
            if c.objective not in self.objectives:
                self.objectives[c.objective] = OBJECTIVES[c.objective](self)
        self.geometry = [Geometry(self, c) for c in self.components]
        self.epoch_positions = sum(g.E for g in self.geometry)
        if self.pack_attention and not all(g.exact and self.objectives[c.objective].segments
                                           for g, c in zip(self.geometry, self.components) if g.packed):
            with_segments = " or ".join(n for n, o in OBJECTIVES.items() if o.segments)
            raise DataError("data.pack_attention needs exactly packed span data: length indexes in the text "
                            f"data (add them: python -m data.index DIR), objective {with_segments}")


class Geometry:
    """Sizes of one dataset's epoch: E positions; per stream L samples and P examples; blocks of B
    samples -> K examples.

    Exact packing (length indexes, packed.py): E = ceil(T / raw_len) chunks of the epoch's T tokens,
    streams of ceil or floor E / V of them, K a nominal count per block. Otherwise (pairs, unpacked
    text, or packed text prepared without indexes): P examples in every stream, E = V x P.
    """

    def __init__(self, spec: StreamSpec, comp: Component):
        V, self.B, self.V = spec.num_streams, spec.shuffle_block, spec.num_streams
        self.N = sum(s.num_samples for s in comp.shards)
        obj = spec.objectives[comp.objective]
        self.exact = obj.exact_packing and spec.pack and has_index(comp.shards)
        if self.exact:
            self.T = sum(s.doc_tokens for s in comp.shards)
            if self.T == 0:
                raise DataError(f"no tokens in {comp.shards[0].url}...")
            self.packed, self.raw_len = True, int(obj.chunk_len())
            self.E = -(-self.T // self.raw_len)
            self.P = -(-self.E // V)
            self.K = max(1, int(self.B * self.T / self.N) // self.raw_len)
            obj.check_target(spec)
            return
        self.L = -(-self.N // V) if not spec.shuffle else self.N // V
        if self.L == 0:
            raise DataError(f"{self.N} samples in {comp.shards[0].url}... cannot fill data.num_streams={V} streams")
        self.n_blocks = -(-self.L // self.B)
        last = self.L - (self.n_blocks - 1) * self.B
        self.packed = obj.reads == "text" and spec.pack
        if self.packed:
            mean = mean_doc_tokens(comp.shards)
            if mean <= 0:
                raise DataError(f"packing needs token counts in the manifest of {comp.shards[0].url} "
                                "(or set data.pack=false)")
            if obj.exact_packing:
                log.warning("data: %s has no length index: packing falls back to per-block chunk counts, which "
                            "drop and repeat tokens (add one: python -m data.index %s)", comp.shards[0].url,
                            comp.shards[0].url.rsplit("/", 1)[0])
            raw = obj.chunk_len()                      # chunks of different lengths (UL2): their mean
            self.K = chunks_per_block(self.B, mean, raw)
            self.K_last = chunks_per_block(last, mean, raw)
        else:
            self.K, self.K_last = self.B, last
        self.P = (self.n_blocks - 1) * self.K + self.K_last
        self.E = V * self.P
        obj.check_target(spec)

    def split(self, q: int) -> tuple[int, int, int]:
        """Dataset position q (row x V + stream, over all epochs) -> (stream, epoch, example index in the stream)."""
        if self.exact:
            e, p = divmod(q, self.E)
            return p % self.V, e, p // self.V
        e, i = divmod(q // self.V, self.P)
        return q % self.V, e, i

    def block_of(self, i: int) -> tuple[int, int]:
        full = (self.n_blocks - 1) * self.K
        return divmod(i, self.K) if i < full else (self.n_blocks - 1, i - full)

    def block_size(self, b: int) -> tuple[int, int]:
        """(samples, examples) of block b."""
        if b < self.n_blocks - 1:
            return self.B, self.K
        return self.L - b * self.B, self.K_last
