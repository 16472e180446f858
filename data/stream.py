"""Streaming webdataset shards with a global sample order that does not depend on the layout.

Each dataset's epoch is a function of (seed, epoch, its shards, data.num_streams = V) only:
  1. its shards are permuted (seeded by seed, dataset, epoch) and laid end to end: N samples;
  2. that sequence is cut into V canonical streams of L = N // V samples (the < V samples left
     over are dropped this epoch, and differ between epochs; validation keeps them, see below);
  3. a stream is read in blocks of `shuffle_block` samples, each permuted by (seed, epoch, stream,
     block); pairs stay one sample per example; an epoch has P examples per stream, known from the
     manifest before anything is read, the same for every stream.
     Span-corruption text with length indexes is packed without loss instead (packed.py): the
     epoch's documents form one token sequence cut into E chunks, streams of consecutive chunks,
     dataset position p = chunk p // V of stream p % V (E need not be a multiple of V); text
     without indexes is packed block by block (packing.py).
The global order is a grid: global position g is row g // V of stream g % V. A single dataset
fills every row (row j = its example j); a mixture gives each row to one dataset (mixture.py).
Pairs are length-bucketed inside windows of global batches (packing.py).

Global batch k is positions [k*G, (k+1)*G) (G = global batch size). Data-parallel rank r takes
the positions g = r (mod dp), in micro-batches of `micro_batch`; inside a micro-batch its loader
worker w takes every nw-th sample, and the main process reassembles the micro-batch. Every rank
yields the same number of micro-batches per step whatever the shard sizes. When dp x workers
divides V, each reader opens only its own streams (V / (dp x workers) of them); otherwise
readers also read (and drop) parts of streams they share.

The resumable state is {"epoch", "cursor"}: g = epoch * E + cursor (E = positions per epoch), at
a step boundary (plus the counters' totals, DataStream.counters). Resuming with another dp size or worker count continues with exactly the
positions not yet consumed. Span-corruption noise is drawn from an RNG keyed by (seed, dataset,
epoch, cursor), so every example is byte-identical on any resume.

Bad data (a sample whose JSON is invalid or empty, a member that does not decode, a truncated or
unreadable shard) is logged with its shard and counted; its slot becomes a placeholder example
whose labels are all ignored (packed text just skips the document), so batch counts and the
order of everything else are unchanged. Past data.max_bad_samples the stream raises DataError.

Validation (shuffle=False): no permutation, streams of L = ceil(N / V) samples so every sample
appears exactly once, the last global batch filled with placeholders: the same examples and the
same loss on every run and every layout.
"""
from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import torch

from data.mixture import Schedule
from data.objectives import collate, placeholder
from data.packing import bucket_assign
from data.reader import PackedReader, StreamReader, seeded_rng
from data.records import BadSamples
from data import procs
from data.sources import DataError, Shard, resolve_source
from data.spec import StreamSpec

__all__ = ["DataError", "DataStream", "Shard", "StreamSpec", "resolve_shards", "steps_in_epoch"]
PACKING_STATS = ("dropped_tokens", "repeated_tokens")      # tokens the fallback packing (packing.py) drops / repeats


def resolve_shards(spec: str, manifest: str = "") -> list[Shard]:
    return resolve_source(spec, manifest)


class _KeyedRNG:
    """A counter-based generator re-keyed per example by a hash of (seed, dataset, epoch, cursor).

    Re-keying one Philox is ~10x cheaper than building a generator per example; the draws depend
    on the key only.
    """

    def __init__(self):
        self.bits = np.random.Philox(key=np.zeros(2, dtype=np.uint64))
        self.gen = np.random.Generator(self.bits)
        self.state = self.bits.state

    def __call__(self, *key: int) -> np.random.Generator:
        digest = hashlib.blake2b(",".join(map(str, key)).encode(), digest_size=16).digest()
        st = self.state
        st["state"]["key"][:] = np.frombuffer(digest, dtype=np.uint64)
        st["state"]["counter"][:] = 0
        st["buffer"][:] = 0
        st["buffer_pos"], st["has_uint32"], st["uinteger"] = 4, 0, 0
        self.bits.state = st
        return self.gen


class Layout:
    """Global position -> example, for one reader (a rank's loader worker)."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.V, self.G = spec, spec.num_streams, spec.global_batch
        self.bad = BadSamples(spec.max_bad_samples)
        self.stats = dict.fromkeys(PACKING_STATS, 0)
        multi = len(spec.components) > 1
        self.schedule = Schedule([c.weight for c in spec.components], spec.global_batch // spec.num_streams,
                                 spec.seed) if multi else None
        self.W = spec.bucket_window if spec.shuffle else 0
        win_items = -(-self.W * self.G // self.V) if self.W else 0
        self.cache_blocks = 2 + -(-win_items // spec.shuffle_block)
        self.readers: dict = {}
        self._shared: dict = {}                         # per dataset: blocks and indexes its packed streams share
        self._buckets: dict = {}
        self.noise_rng = _KeyedRNG()

    def reader(self, c: int, v: int):
        if (c, v) not in self.readers:
            if self.spec.geometry[c].exact:
                self.readers[(c, v)] = PackedReader(self.spec, c, v, self.bad, self.stats, self.cache_blocks,
                                                    self._shared.setdefault(c, {}))
            else:
                self.readers[(c, v)] = StreamReader(self.spec, c, v, self.bad, self.stats, self.cache_blocks)
        return self.readers[(c, v)]

    def locate(self, g: int) -> tuple[int, int, int, int]:
        """-> (dataset c, stream v, epoch e of that dataset, example index i in that stream's epoch)."""
        v, j = g % self.V, g // self.V
        c, r = self.schedule.locate(j) if self.schedule else (0, j)
        geo = self.spec.geometry[c]
        if self.W and not geo.packed:
            return (c, v) + divmod(self._bucketed(c, v, g), geo.P)
        return (c,) + geo.split(r * self.V + v)

    def _bucketed(self, c: int, v: int, g: int) -> int:
        span = self.W * self.G
        w = g // span
        if self._buckets.get((c, v), (None,))[0] != w:
            lo = w * span + ((v - w * span) % self.V)                 # first position of stream v in the window
            rows = np.arange((lo - v) // self.V, (w * span + span - v + self.V - 1) // self.V)
            if self.schedule:
                rows = rows[[self.schedule.locate(int(j))[0] == c for j in rows]]
            i0 = self.schedule.locate(int(rows[0]))[1] if self.schedule else int(rows[0])
            items = np.arange(i0, i0 + len(rows))
            rdr = self.reader(c, v)
            lengths = np.array([rdr.length(int(i)) for i in items])
            order = seeded_rng(self.spec.seed, c, w, 11).permutation(self.W)
            rank = {w * self.W + k: int(order[k]) for k in range(self.W)}
            a = bucket_assign(lengths, items // self.spec.geometry[c].P, (rows * self.V + v) // self.G, rank)
            self._buckets[(c, v)] = (w, dict(zip(rows.tolist(), (i0 + a).tolist())))
        return self._buckets[(c, v)][1][g // self.V]

    def examples(self, gs: list[int]) -> list[dict]:
        """The examples at global positions gs, made by their datasets' objectives (data/registry.py).
        An objective may complete its examples together (packed span rows, all raw_len long, are
        corrupted at once); each one's noise still depends on its own position only."""
        spec, out, pending = self.spec, [], {}
        for g in gs:
            if not spec.shuffle and g >= spec.epoch_positions:
                out.append(placeholder())                          # validation: past the last sample
                continue
            c, v, e_c, i = self.locate(g)
            item = self.reader(c, v).item(e_c, i)
            if item is None:
                out.append(placeholder())
                continue
            comp = spec.components[c]
            ex = {"key": f"{comp.name}/{item[0]}" if comp.name else item[0]}
            out.append(ex)
            e, cursor = divmod(g, spec.epoch_positions)
            p = spec.objectives[comp.objective].start(spec, c, ex, item,
                                                      lambda k=(spec.seed, c, e, cursor): self.noise_rng(*k))
            if p is not None:
                pending.setdefault(comp.objective, []).append(p)
        for name, ps in pending.items():
            spec.objectives[name].finish(spec, ps)
        return out


def collate_segments(samples: list[dict], S: int) -> torch.Tensor:
    """(B, S) document ids of each source token (a sample without them is one document; padding -1)."""
    out = np.full((len(samples), S), -1, dtype=np.int64)
    for i, smp in enumerate(samples):
        seg = smp.get("segments")
        n = min(S, len(smp["src"]))
        out[i, :n] = seg[:n] if seg is not None else 0
    return torch.from_numpy(out)


def steps_in_epoch(spec: StreamSpec, epoch: int = 0) -> int:
    """Global batches in an epoch: whole ones for training, all (the last one padded) for validation."""
    E, G = spec.epoch_positions, spec.global_batch
    return E // G if spec.shuffle else -(-E // G)


def _as_is(x):
    """The loader's collate_fn: parts stay numpy (pickled whole), not tensors sent one by one."""
    return x


class _RankParts(torch.utils.data.IterableDataset):
    """One rank's micro-batches from `start`; a loader worker yields its share of each micro-batch."""

    def __init__(self, spec, start, dp_rank, dp_size, micro_batch, n_micro):
        self.spec, self.start, self.dp_rank, self.dp_size = spec, start, dp_rank, dp_size
        self.mb, self.n_micro = micro_batch, n_micro

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        layout = Layout(self.spec)
        t = 0
        while self.n_micro is None or t < self.n_micro:
            part, err = [], None
            first = t * self.mb
            qs = list(range(first + (w - first) % nw, first + self.mb, nw))
            try:
                exs = layout.examples([self.start + self.dp_rank + self.dp_size * q for q in qs])
                part = [(q - first, ex) for q, ex in zip(qs, exs)]
            except DataError as e:
                err = str(e)
            yield part, {"bad": layout.bad.count, **layout.stats, "error": err}
            if err:
                return
            t += 1


class DataStream:
    """Endless iterator of micro-batches for one data-parallel rank; checkpointable.

    Each batch: src, src_mask, tgt_in, labels (tensors), keys, pad_frac (padding share of its
    token slots). Counters: skipped (bad samples seen by this rank's readers), stats (dropped /
    repeated packing tokens), pad_frac (over every batch so far); counters() sums the first two
    over the data-parallel ranks with `reduce` (a collective summing a list of numbers over them;
    None: this process alone), and the state (state_dict) holds those totals, restored on
    data-parallel rank 0 (so the sums go on from them on any layout).
    """

    def __init__(self, spec: StreamSpec, dp_rank: int, dp_size: int, micro_batch: int, num_workers: int = 0,
                 reduce=None):
        if spec.global_batch % (micro_batch * dp_size):
            raise DataError(f"global batch {spec.global_batch} is not a multiple of micro batch {micro_batch} "
                            f"x dp {dp_size}")
        self.spec, self.dp_rank, self.dp_size = spec, dp_rank, dp_size
        self.micro_batch, self.num_workers, self.reduce = micro_batch, num_workers, reduce
        self.g = 0                                      # next global position of this rank's micro-batches
        self.skipped, self.stats = 0, dict.fromkeys(PACKING_STATS, 0)
        self._real = self._slots = 0
        readers = dp_size * max(1, num_workers)
        if spec.num_streams % readers and dp_rank == 0 and spec.shuffle:
            print(f"data: num_streams={spec.num_streams} is not a multiple of dp x workers = {readers}: "
                  "readers share streams and read more than their part", file=sys.stderr)

    @property
    def pad_frac(self) -> float:
        return 1.0 - self._real / self._slots if self._slots else 0.0

    def counters(self) -> dict:
        """{"bad_samples", "packing": {name: tokens}} summed over the data-parallel ranks (collective
        with `reduce`: every rank calls it)."""
        vals = [float(self.skipped)] + [float(self.stats.get(k, 0)) for k in PACKING_STATS]
        if self.reduce is not None:
            vals = [float(v) for v in self.reduce(vals)]
        return {"bad_samples": int(vals[0]), "packing": {k: int(v) for k, v in zip(PACKING_STATS, vals[1:])}}

    def state_dict(self) -> dict:
        """The position and the counters' totals (collective with `reduce`, as counters())."""
        e, cursor = divmod(self.g, self.spec.epoch_positions)
        return {"epoch": e, "cursor": cursor, "counters": self.counters()}

    def load_state_dict(self, state: dict) -> None:
        g = int(state["epoch"]) * self.spec.epoch_positions + int(state["cursor"])
        if g % (self.micro_batch * self.dp_size):
            raise DataError(f"data state {state} is not at a micro-batch boundary of micro_batch "
                            f"{self.micro_batch} x dp {self.dp_size}")
        self.g = g
        c = (state.get("counters") or {}) if self.dp_rank == 0 else {}     # the totals go on from rank 0
        self.skipped = int(c.get("bad_samples", 0))
        self.stats = {k: int((c.get("packing") or {}).get(k, 0)) for k in PACKING_STATS}

    def _parts(self):
        n_micro = None
        if not self.spec.shuffle:                       # validation: one pass, then stop
            end = steps_in_epoch(self.spec) * self.spec.global_batch
            n_micro = max(0, math.ceil((end - self.g) / (self.micro_batch * self.dp_size)))
        ds = _RankParts(self.spec, self.g, self.dp_rank, self.dp_size, self.micro_batch, n_micro)
        if self.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                                             persistent_workers=False, prefetch_factor=4,
                                             worker_init_fn=procs.worker_init)   # stop signals: data/procs.py
        with procs.blocked():                           # the workers start here
            return iter(loader)

    def __iter__(self):
        nw, mb = max(1, self.num_workers), self.micro_batch
        parts, base_bad, base_stats = self._parts(), self.skipped, dict(self.stats)
        worker_bad, worker_stats = [0] * nw, [{} for _ in range(nw)]
        while True:
            samples = [None] * mb
            for w in range(nw):
                try:
                    part, st = next(parts)
                except StopIteration:
                    return
                if st["error"]:
                    raise DataError(st["error"])
                for q, s in part:
                    samples[q] = s
                worker_bad[w] = st["bad"]
                worker_stats[w] = {k: v for k, v in st.items() if k not in ("bad", "error")}
            self.skipped = base_bad + sum(worker_bad)
            self.stats = {k: base_stats.get(k, 0) + sum(ws.get(k, 0) for ws in worker_stats) for k in PACKING_STATS}
            if self.skipped > self.spec.max_bad_samples:
                raise DataError(f"{self.skipped} bad samples on this rank, more than data.max_bad_samples="
                                f"{self.spec.max_bad_samples} (see the log lines above)")
            batch = collate(samples, self.spec.max_src_len, self.spec.max_tgt_len)
            if self.spec.pack_attention:
                batch["src_segments"] = collate_segments(samples, batch["src"].shape[1])
            n_src, n_tgt = batch["n_real"]
            self._real += n_src + n_tgt
            self._slots += batch["src"].numel() + batch["labels"].numel()
            self.g += mb * self.dp_size
            yield batch
