"""Streaming webdataset shards with a global sample order that does not depend on the layout.

The order of an epoch is a function of (seed, epoch, shards, data.num_streams) only:

  1. the shards are permuted (seeded by seed, epoch) and laid end to end: N samples;
  2. that sequence is cut into V = num_streams equal canonical streams of L = N // V samples
     (the < V samples left over are dropped this epoch, and differ between epochs);
  3. inside a stream, blocks of `shuffle_block` consecutive samples are permuted (seed, epoch, v, block);
  4. global position g is item g // V of stream g % V (round-robin over the streams).

Global batch k is positions [k*G, (k+1)*G) (G = global batch size). Data-parallel rank r takes
the positions g = r (mod dp); its loader worker w takes every nw-th of those, so the DataLoader's
round-robin over workers returns rank r's positions in order. An epoch has E // G steps with
E = V*L, the same number for every rank, whatever the shard sizes.

Each stream is read sequentially (tar streaming works for local files, pipe: and remote URLs);
when (dp x workers) divides V, each reader opens only its own streams. The resumable state is
just {"epoch", "cursor"}: the global position reached at a step boundary. Resuming with another
dp size or worker count continues with exactly the positions not yet consumed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data.objectives import collate, raw_length_for, span_corrupt
from data.prepare import load_manifest
from data.tokenizer import EOS_ID


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


def resolve_shards(spec: str) -> list[Shard]:
    """A prepared folder (with manifest.json) or a manifest path -> its shards."""
    man = load_manifest(spec)
    base = os.path.dirname(spec) if spec.endswith(".json") else spec
    shards = [Shard(os.path.join(base, s["name"]), int(s["num_samples"])) for s in man["shards"]]
    for s in shards:
        if not os.path.isfile(s.url):
            raise FileNotFoundError(f"shard listed in the manifest is missing: {s.url}")
    if not shards or sum(s.num_samples for s in shards) == 0:
        raise ValueError(f"no samples in {spec}")
    return shards


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def epoch_streams(shards: list[Shard], num_streams: int, seed: int, epoch: int, shuffle: bool = True):
    """-> (segments per stream [(shard index, start, end)], samples per stream L)."""
    order = _rng(seed, epoch, 0).permutation(len(shards)) if shuffle else np.arange(len(shards))
    total = sum(s.num_samples for s in shards)
    L = total // num_streams
    if L == 0:
        raise ValueError(f"{total} samples cannot fill data.num_streams={num_streams} streams")
    streams, pos = [[] for _ in range(num_streams)], 0
    for i in order:
        n = shards[i].num_samples
        a = 0
        while a < n:
            v = pos // L
            if v >= num_streams:
                break
            b = min(n, a + (v + 1) * L - pos)
            streams[v].append((int(i), a, b))
            pos += b - a
            a = b
    return streams, L


def _read_shard(url: str):
    """Yields (key, raw sample dict) from one tar shard, in file order."""
    stream = wds.gopen(url)
    try:
        files = (dict(f, __url__=url) for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            yield sample["__key__"], sample
    finally:
        stream.close()


class StreamReader:
    """Sequential random access (non-decreasing positions) into one canonical stream."""

    def __init__(self, shards, segments, length, block, seed, epoch, v, shuffle):
        self.shards, self.segments, self.length = shards, segments, length
        self.block, self.key, self.shuffle = block, (seed, epoch, v), shuffle
        self._seg = -1          # index of the open segment
        self._it = None
        self._raw = 0           # raw stream position of the next sample from _it
        self._seg_starts = np.cumsum([0] + [b - a for _, a, b in segments])
        self._b, self._items, self._perm = -1, [], None

    def _seek_raw(self, target: int):
        """Positions the raw iterator so that the next sample read is raw position `target`."""
        if self._it is None or target < self._raw or not (self._seg_starts[self._seg] <= target < self._seg_starts[self._seg + 1]):
            seg = int(np.searchsorted(self._seg_starts, target, side="right") - 1)
            shard_i, a, _ = self.segments[seg]
            self._seg, self._it, self._raw = seg, _read_shard(self.shards[shard_i].url), self._seg_starts[seg]
            for _ in range(a):
                next(self._it)
        while self._raw < target:
            self._next_raw()

    def _next_raw(self):
        if self._raw >= self._seg_starts[self._seg + 1]:
            self._seg += 1
            shard_i, a, _ = self.segments[self._seg]
            self._it = _read_shard(self.shards[shard_i].url)
            for _ in range(a):
                next(self._it)
        try:
            item = next(self._it)
        except StopIteration:
            url = self.shards[self.segments[self._seg][0]].url
            raise RuntimeError(f"shard {url} has fewer samples than its manifest says") from None
        self._raw += 1
        return item

    def get(self, j: int):
        b = j // self.block
        if b != self._b:
            lo, hi = b * self.block, min((b + 1) * self.block, self.length)
            self._seek_raw(lo)
            self._items = [self._next_raw() for _ in range(hi - lo)]
            self._perm = _rng(*self.key, b).permutation(hi - lo) if self.shuffle else np.arange(hi - lo)
            self._b = b
        return self._items[self._perm[j - b * self.block]]


@dataclass
class StreamSpec:
    """What a reader needs; plain data so it pickles into loader workers."""
    shards: list
    objective: str
    num_streams: int
    shuffle_block: int
    seed: int
    global_batch: int
    max_src_len: int
    max_tgt_len: int
    noise_density: float
    mean_span_length: float
    n_sentinels: int
    shuffle: bool = True


def steps_in_epoch(spec: StreamSpec, epoch: int) -> int:
    _, L = epoch_streams(spec.shards, spec.num_streams, spec.seed, epoch, spec.shuffle)
    return (spec.num_streams * L) // spec.global_batch


def make_sample(spec: StreamSpec, epoch: int, g: int, key: str, raw: dict) -> dict:
    try:
        rec = json.loads(raw["json"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"sample {key} in {raw.get('__url__', '?')}: bad json member ({e})") from None
    if spec.objective == "pairs":
        return {"key": key, "src": np.asarray(rec["src"], np.int32), "tgt": np.asarray(rec["tgt"], np.int32)}
    ids = np.asarray(rec["ids"], np.int32)
    if len(ids) and ids[-1] == EOS_ID:
        ids = ids[:-1]
    ids = ids[:raw_length_for(spec.max_src_len, spec.noise_density, spec.mean_span_length)]
    src, tgt = span_corrupt(ids, spec.noise_density, spec.mean_span_length, spec.n_sentinels,
                            _rng(spec.seed, epoch, g, 1))
    return {"key": key, "src": src, "tgt": tgt}


def iter_positions(spec: StreamSpec, epoch: int, start: int, step: int):
    """Samples at global positions start, start+step, ... up to the epoch's last full batch."""
    segments, L = epoch_streams(spec.shards, spec.num_streams, spec.seed, epoch, spec.shuffle)
    end = (spec.num_streams * L) // spec.global_batch * spec.global_batch
    readers = {}
    for g in range(start, end, step):
        v, j = g % spec.num_streams, g // spec.num_streams
        if v not in readers:
            readers[v] = StreamReader(spec.shards, segments[v], L, spec.shuffle_block, spec.seed, epoch, v,
                                      spec.shuffle)
        key, raw = readers[v].get(j)
        yield make_sample(spec, epoch, g, key, raw)


class _RankReader(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, epoch: int, cursor: int, dp_rank: int, dp_size: int):
        self.spec, self.epoch, self.cursor, self.dp_rank, self.dp_size = spec, epoch, cursor, dp_rank, dp_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        start = self.cursor + self.dp_rank + self.dp_size * w
        return iter_positions(self.spec, self.epoch, start, self.dp_size * nw)


class DataStream:
    """Endless iterator of micro-batches for one data-parallel rank; checkpointable."""

    def __init__(self, spec: StreamSpec, dp_rank: int, dp_size: int, micro_batch: int, num_workers: int = 0):
        if spec.global_batch % (micro_batch * dp_size):
            raise ValueError(f"global batch {spec.global_batch} is not a multiple of micro batch {micro_batch} x dp {dp_size}")
        self.spec, self.dp_rank, self.dp_size = spec, dp_rank, dp_size
        self.micro_batch, self.num_workers = micro_batch, num_workers
        self.epoch, self.cursor = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def _loader(self):
        ds = _RankReader(self.spec, self.epoch, self.cursor, self.dp_rank, self.dp_size)
        if self.num_workers == 0:
            return iter(ds)
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                persistent_workers=False, prefetch_factor=64))

    def __iter__(self):
        per_batch = self.micro_batch * self.dp_size      # global positions consumed per micro-batch
        while True:
            if steps_in_epoch(self.spec, self.epoch) * self.spec.global_batch <= self.cursor:
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            buf = []
            for sample in self._loader():
                buf.append(sample)
                if len(buf) == self.micro_batch:
                    batch = collate(buf, self.spec.max_src_len, self.spec.max_tgt_len)
                    buf = []
                    self.cursor += per_batch
                    yield batch
            self.epoch, self.cursor = self.epoch + 1, 0
