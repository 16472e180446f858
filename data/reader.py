"""Reading one dataset's canonical stream: epoch layout, blocks, shuffling, packing, bad samples."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import closing
from itertools import islice

import numpy as np

from data.mixture import Component
from data.packed import Block, EpochLayout, IndexCache, chunk_from_blocks, stream_range
from data.packing import pack_block
from data.rawtext import decode_raw
from data.records import BadSamples, decode
from data.registry import sample_kind
from data.sources import Shard
from data.spec import StreamSpec
from data.tar import ShardError, iter_samples

RAW_BATCH = 128                # raw text samples tokenized per call


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def epoch_streams(shards: list[Shard], num_streams: int, L: int, seed: int, c: int, epoch: int, shuffle: bool):
    """-> segments per stream [(shard index, start, end)]: the permuted shards cut into streams of L."""
    order = seeded_rng(seed, c, epoch, 0).permutation(len(shards)) if shuffle else np.arange(len(shards))
    streams, pos = [[] for _ in range(num_streams)], 0
    for i in order:
        n, a = shards[i].num_samples, 0
        while a < n and pos < num_streams * L:
            v = pos // L
            b = min(n, a + (v + 1) * L - pos)
            streams[v].append((int(i), a, b))
            pos += b - a
            a = b
    return streams


def read_docs(shard: Shard, skip: int, count: int, comp: Component, bad: BadSamples, vocab: int = 0):
    """Exactly `count` (key, doc or None) of a shard from sample `skip`; a short shard -> None for the rest.

    Raw text (comp.raw) is tokenized here, a batch of samples per call."""
    n, why = 0, f"has fewer samples than its manifest says ({shard.num_samples})"
    kind, batch = sample_kind(comp.objective), []

    def flush():
        nonlocal n
        docs = (decode_raw(batch, comp.raw) if comp.raw else
                [decode(raw, kind, shard.url, key, vocab) for key, raw in batch])
        for (key, _), doc in zip(batch, docs):
            if isinstance(doc, str):
                bad.add(shard.url, skip + n, 1, doc)
                doc = None
            yield key, doc
            n += 1
        batch.clear()
    try:
        with closing(iter_samples(shard.url, skip)) as it:
            for item in islice(it, count):
                batch.append(item)
                if len(batch) >= (RAW_BATCH if comp.raw else 1):
                    yield from flush()
    except ShardError as e:
        why = str(e)
    yield from flush()
    if n < count:
        bad.add(shard.url, skip + n, count - n, f"samples {skip + n}..{skip + count - 1} unreadable: {why}")
        for _ in range(count - n):
            yield "", None


class StreamReader:
    """The examples of dataset c's canonical stream v, over all epochs: item(i) for (mostly) rising i."""

    def __init__(self, spec: StreamSpec, c: int, v: int, bad: BadSamples, stats: dict, cache_blocks: int = 3):
        self.spec, self.c, self.v, self.bad, self.stats = spec, c, v, bad, stats
        self.comp, self.geo = spec.components[c], spec.geometry[c]
        self._segs: dict = {}
        self._blocks: OrderedDict = OrderedDict()
        self.cache_blocks = cache_blocks
        self._cur = None                      # (epoch, next stream position, generator)

    def _segments(self, e: int):
        if e not in self._segs:
            segs = epoch_streams(self.comp.shards, self.spec.num_streams, self.geo.L, self.spec.seed, self.c, e,
                                 self.spec.shuffle)[self.v]
            self._segs = {e: (segs, np.cumsum([0] + [b - a for _, a, b in segs]))}
        return self._segs[e]

    def _segment_docs(self, shard: Shard, skip: int, count: int):
        return read_docs(shard, skip, count, self.comp, self.bad, self.spec.vocab_size)

    def _docs(self, e: int, lo: int, n: int) -> list:
        """Stream positions lo..lo+n-1 of epoch e; positions past the stream's samples are None (padding)."""
        segs, starts = self._segments(e)
        out = []
        for p in range(lo, lo + n):
            if p >= starts[-1]:
                out.append(("", None))
                continue
            if self._cur is None or self._cur[:2] != (e, p):
                s = int(np.searchsorted(starts, p, side="right") - 1)
                shard_i, a, b = segs[s]
                gen = self._chain(e, s, a + p - starts[s])
                self._cur = (e, p, gen)
            out.append(next(self._cur[2]))
            self._cur = (e, p + 1, self._cur[2])
        return out

    def _chain(self, e: int, s: int, skip: int):
        segs, _ = self._segments(e)
        for k in range(s, len(segs)):
            shard_i, a, b = segs[k]
            yield from self._segment_docs(self.comp.shards[shard_i], skip if k == s else a, b - (skip if k == s else a))

    def _block(self, e: int, b: int) -> list:
        if (e, b) in self._blocks:
            self._blocks.move_to_end((e, b))
            return self._blocks[(e, b)]
        spec, geo = self.spec, self.geo
        n_docs, n_items = geo.block_size(b)
        docs = self._docs(e, b * geo.B, n_docs)
        if spec.shuffle:
            perm = seeded_rng(spec.seed, self.c, e, self.v, b).permutation(n_docs)
            docs = [docs[k] for k in perm]
        obj = spec.objectives[self.comp.objective]
        if geo.packed:                                  # chunk lengths (and tags: UL2's denoisers) keyed by the block
            raw, tags = obj.block_chunks(n_items, lambda: seeded_rng(spec.seed, self.c, e, self.v, b, 13))
            items, (dropped, repeated) = pack_block([d for _, d in docs], [k for k, _ in docs], n_items, raw)
            if tags is not None:
                items = [None if it is None else (*it, int(t)) for it, t in zip(items, tags)]
            self.stats["dropped_tokens"] += dropped
            self.stats["repeated_tokens"] += repeated
        elif obj.reads == "text":
            n = obj.max_chunk()
            items = [(k, d[:n]) if d is not None else None for k, d in docs]
        else:
            items = [(k, d) if d is not None else None for k, d in docs]
        self._blocks[(e, b)] = items
        while len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return items

    def item(self, e: int, i: int):
        b, k = self.geo.block_of(i)
        return self._block(e, b)[k]

    def length(self, i: int) -> int:
        it = self.item(*divmod(i, self.geo.P))
        if it is None:
            return 0
        return len(it[1]) if sample_kind(self.comp.objective) == "text" else len(it[1][0]) + len(it[1][1])


class PackedReader:
    """The chunks of dataset c's canonical stream v under exact packing (packed.py): item(e, i).

    `shared` (one per dataset in a Layout) holds the block cache and the length indexes, so streams
    read by the same process never read a block twice.
    """

    def __init__(self, spec: StreamSpec, c: int, v: int, bad: BadSamples, stats: dict, cache_blocks: int = 3,
                 shared: dict | None = None):
        self.spec, self.c, self.v, self.bad = spec, c, v, bad
        self.comp, self.geo = spec.components[c], spec.geometry[c]
        shared = shared if shared is not None else {}
        if "blocks" not in shared:
            shared.update(blocks=OrderedDict(), index=IndexCache(self.comp.shards), readers=0)
        shared["readers"] += 1
        self.shared, self.index, self._blocks = shared, shared["index"], shared["blocks"]
        self._epoch = (None, None)
        per_block = self.geo.B * self.geo.T / max(1, self.geo.N)            # tokens in a block, on average
        self.cache_blocks = max(cache_blocks, 2 + int(np.ceil(self.geo.raw_len / max(per_block, 1.0))))
        self._cur = None                      # (epoch, next document, generator over the epoch's documents)

    def _layout(self, e: int) -> EpochLayout:
        if self._epoch[0] != e:
            n = len(self.comp.shards)
            order = seeded_rng(self.spec.seed, self.c, e, 0).permutation(n) if self.spec.shuffle else np.arange(n)
            self._epoch = (e, EpochLayout(self.comp.shards, self.index, order, self.geo.B))
        return self._epoch[1]

    def _read(self, e: int, lay: EpochLayout, lo: int, hi: int) -> list:
        if self._cur is None or self._cur[:2] != (e, lo):
            gen = (doc for i, a, b in lay.segments(lo, lay.N)
                   for doc in read_docs(self.comp.shards[i], a, b - a, self.comp, self.bad, self.spec.vocab_size))
            self._cur = (e, lo, gen)
        docs = list(islice(self._cur[2], hi - lo))
        self._cur = (e, hi, self._cur[2])
        return docs

    def _block(self, e: int, b: int) -> Block:
        if (e, b) in self._blocks:
            self._blocks.move_to_end((e, b))
            return self._blocks[(e, b)]
        lay, B = self._layout(e), self.geo.B
        lo, hi = b * B, min(lay.N, (b + 1) * B)
        lengths = lay.doc_lengths(lo, hi)
        docs = self._read(e, lay, lo, hi)
        bad = np.zeros(hi - lo, dtype=bool)
        for k, ((key, doc), n) in enumerate(zip(docs, lengths)):
            if doc is not None and len(doc) != n:
                i, a = self._where(lay, lo + k)
                self.bad.add(self.comp.shards[i].url, a, 1,
                             f"sample {key} has {len(doc)} tokens, its length index says {n}")
                doc = None
            bad[k] = doc is None and n > 0
        perm = (seeded_rng(self.spec.seed, self.c, e, b, 5).permutation(hi - lo) if self.spec.shuffle
                else np.arange(hi - lo))
        flat = np.zeros(int(lengths.sum()), dtype=np.int32)
        at = 0
        for k in perm:
            if not bad[k] and lengths[k]:
                flat[at:at + lengths[k]] = docs[k][1]
            at += int(lengths[k])
        blk = Block(lay.tokens_before(lo), [docs[k][0] for k in perm], lengths[perm], flat, bad[perm])
        self._blocks[(e, b)] = blk
        while len(self._blocks) > self.cache_blocks * self.shared["readers"]:
            self._blocks.popitem(last=False)
        return blk

    @staticmethod
    def _where(lay: EpochLayout, d: int) -> tuple[int, int]:
        i, a, _ = lay.segments(d, d + 1)[0]
        return i, a

    def item(self, e: int, i: int):
        """(key, tokens, segment ids) of chunk i of this stream in epoch e, or None (a bad document)."""
        first, n = stream_range(self.geo.E, self.spec.num_streams, self.v)
        assert i < n, (self.v, i, n)
        lay, R = self._layout(e), self.geo.raw_len
        t0 = (first + i) * R
        t1 = min(t0 + R, lay.T)
        blocks, b = [], lay.block_of_token(t0)
        while True:
            blk = self._block(e, b)
            blocks.append(blk)
            if blk.end >= t1 or b + 1 >= lay.n_blocks:
                break
            b += 1
        return chunk_from_blocks(blocks, t0, t1, self.spec.pack_attention)
