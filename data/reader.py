"""Reading one dataset's canonical stream: epoch layout, blocks, shuffling, packing, bad samples."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import closing
from itertools import islice

import numpy as np

from data.packing import pack_block
from data.records import BadSamples, decode
from data.sources import Shard, ShardError, iter_samples
from data.spec import StreamSpec


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
        """Exactly `count` (key, doc or None) of a shard from sample `skip`; a short shard -> None for the rest."""
        n, why = 0, f"has fewer samples than its manifest says ({shard.num_samples})"
        try:
            with closing(iter_samples(shard.url, skip)) as it:
                for key, raw in islice(it, count):
                    doc = decode(raw, "pairs" if self.comp.objective == "pairs" else "span", shard.url, key)
                    if isinstance(doc, str):
                        self.bad.add(shard.url, skip + n, 1, doc)
                        doc = None
                    yield key, doc
                    n += 1
        except ShardError as e:
            why = str(e)
        if n < count:
            self.bad.add(shard.url, skip + n, count - n, f"samples {skip + n}..{skip + count - 1} unreadable: {why}")
            for _ in range(count - n):
                yield "", None

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
        ul2 = self.comp.objective == "ul2"
        if geo.packed:
            raw = spec.raw_len
            if ul2:                                     # each chunk its denoiser's length, keyed by the block
                ds = spec.ul2_plan.draw(seeded_rng(spec.seed, self.c, e, self.v, b, 13), n_items)
                raw = [spec.ul2_plan.raw[d] for d in ds]
            items, (dropped, repeated) = pack_block([d for _, d in docs], [k for k, _ in docs], n_items, raw)
            if ul2:
                items = [None if it is None else (*it, int(d)) for it, d in zip(items, ds)]
            self.stats["dropped_tokens"] += dropped
            self.stats["repeated_tokens"] += repeated
        elif self.comp.objective != "pairs":
            n = max(spec.ul2_plan.raw) if ul2 else spec.raw_len
            items = [(k, d[:n]) if d is not None else None for k, d in docs]
        else:
            items = [(k, d) if d is not None else None for k, d in docs]
        self._blocks[(e, b)] = items
        while len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return items

    def item(self, i: int):
        e, ie = divmod(i, self.geo.P)
        b, k = self.geo.block_of(ie)
        return self._block(e, b)[k]

    def length(self, i: int) -> int:
        it = self.item(i)
        if it is None:
            return 0
        return len(it[1]) if self.comp.objective != "pairs" else len(it[1][0]) + len(it[1][1])
