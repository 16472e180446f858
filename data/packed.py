"""Packing that loses no token: span-corruption text cut from one token sequence per epoch.

`encdec prepare` writes, next to each shard, a length index (SHARD.len: one little-endian uint32
per document, its token count without </s>) and records its name and sum in the manifest
(`index`, `doc_tokens`). From the manifest alone an epoch's token count T is known, hence its
number of examples E = ceil(T / raw_len), before anything is read.

An epoch of dataset c:
  1. its shards are permuted by (seed, c, epoch) and laid end to end: N documents;
  2. that sequence is read in blocks of `shuffle_block` documents, each permuted by (seed, c,
     epoch, block); the documents' tokens laid end to end are the epoch's token sequence;
  3. chunk k is tokens [k * raw_len, (k + 1) * raw_len) of it (the last one may be shorter): a
     chunk carries on into the next block, so nothing is dropped or repeated;
  4. the E chunks are cut into V = data.num_streams canonical streams of consecutive chunks
     (ceil or floor of E / V each); dataset position p of the epoch is chunk i = p // V of
     stream p % V.
Where a chunk starts is found from the index: the shard holding token t (manifest sums), then
the document (the shard's index), whose block is the block of that token, as a block's
permutation keeps its token count. A reader of stream v reads the blocks of its own chunks only.

A document that cannot be read, or whose length differs from its index, keeps its slot (its
tokens are zeros) and every chunk touching it becomes a placeholder, so nothing else moves.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from data.sources import DataError, read_bytes
from data.tokenizer import EOS_ID

INDEX_DTYPE = np.dtype("<u4")
INDEX_SUFFIX = ".len"


def index_name(shard_name: str) -> str:
    return (shard_name[:-4] if shard_name.endswith(".tar") else shard_name) + INDEX_SUFFIX


def doc_length(ids) -> int:
    """Tokens a reader packs of a document (its ids without the trailing </s>)."""
    return len(ids) - 1 if len(ids) and ids[-1] == EOS_ID else len(ids)


def has_index(shards) -> bool:
    return bool(shards) and all(s.index and s.doc_tokens >= 0 for s in shards)


def stream_range(E: int, V: int, v: int) -> tuple[int, int]:
    """(first chunk, chunk count) of stream v when E chunks are cut into V streams."""
    base, rem = divmod(E, V)
    return v * base + min(v, rem), base + (v < rem)


class IndexCache:
    """Prefix sums of shard length indexes, read on demand (a few kept)."""

    def __init__(self, shards, keep: int = 64):
        self.shards, self.keep, self._c = shards, keep, OrderedDict()

    def prefix(self, i: int) -> np.ndarray:
        if i in self._c:
            self._c.move_to_end(i)
            return self._c[i]
        s = self.shards[i]
        raw = read_bytes(s.index)
        if len(raw) % 4 or len(raw) // 4 != s.num_samples:
            raise DataError(f"length index {s.index} has {len(raw) / 4:g} entries, the manifest says "
                            f"{s.num_samples} samples (prepare the data again)")
        pre = np.zeros(s.num_samples + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(raw, dtype=INDEX_DTYPE), out=pre[1:])
        if pre[-1] != s.doc_tokens:
            raise DataError(f"length index {s.index} sums to {pre[-1]} tokens, the manifest says {s.doc_tokens}")
        self._c[i] = pre
        while len(self._c) > self.keep:
            self._c.popitem(last=False)
        return pre


class EpochLayout:
    """Where the documents and tokens of one epoch are (shard order, blocks)."""

    def __init__(self, shards, index: IndexCache, order: np.ndarray, B: int):
        self.shards, self.index, self.order, self.B = shards, index, order, B
        n = np.array([shards[i].num_samples for i in order], dtype=np.int64)
        t = np.array([shards[i].doc_tokens for i in order], dtype=np.int64)
        self.doc_start = np.concatenate([[0], np.cumsum(n)])      # first document of each shard (in order)
        self.tok_start = np.concatenate([[0], np.cumsum(t)])
        self.N, self.T = int(self.doc_start[-1]), int(self.tok_start[-1])
        self.n_blocks = -(-self.N // B)

    def tokens_before(self, d: int) -> int:
        """Tokens of documents 0..d-1 of the epoch (block permutations keep block sums)."""
        if d >= self.N:
            return self.T
        s = int(np.searchsorted(self.doc_start, d, side="right") - 1)
        return int(self.tok_start[s] + self.index.prefix(int(self.order[s]))[d - self.doc_start[s]])

    def block_of_token(self, t: int) -> int:
        s = int(np.searchsorted(self.tok_start, t, side="right") - 1)
        pre = self.index.prefix(int(self.order[s]))
        o = int(np.searchsorted(pre, t - self.tok_start[s], side="right") - 1)
        return int((self.doc_start[s] + o) // self.B)

    def segments(self, lo: int, hi: int):
        """Documents lo..hi-1 as (shard index, first, end) pieces, in order."""
        out, d = [], lo
        while d < hi:
            s = int(np.searchsorted(self.doc_start, d, side="right") - 1)
            a = d - int(self.doc_start[s])
            b = min(int(self.doc_start[s + 1]), hi) - int(self.doc_start[s])
            out.append((int(self.order[s]), a, b))
            d += b - a
        return out

    def doc_lengths(self, lo: int, hi: int) -> np.ndarray:
        return np.concatenate([np.diff(self.index.prefix(i)[a:b + 1]) for i, a, b in self.segments(lo, hi)])


class Block:
    """One block's documents in their shuffled order, laid end to end."""

    def __init__(self, start: int, keys: list, lengths: np.ndarray, flat: np.ndarray, bad: np.ndarray):
        self.start, self.keys, self.flat, self.bad = start, keys, flat, bad     # bad: per document
        self.any_bad = bool(bad.any())
        self.doc_start = np.concatenate([[0], np.cumsum(lengths)])

    @property
    def end(self) -> int:
        return self.start + len(self.flat)


def chunk_from_blocks(blocks: list, t0: int, t1: int, segments: bool = False):
    """(key, tokens[, segment ids]) of tokens [t0, t1), or None if it touches a bad document.

    blocks: consecutive Blocks covering [t0, t1). Segment ids number the chunk's documents 0, 1, ...
    """
    parts, segs, key, seg = [], [], None, 0
    for blk in blocks:
        a, b = max(t0, blk.start) - blk.start, min(t1, blk.end) - blk.start
        if b <= a:
            continue
        d0 = int(blk.doc_start.searchsorted(a, side="right")) - 1
        if key is None:
            key = f"{blk.keys[d0]}@{a - blk.doc_start[d0]}"
        if blk.any_bad or segments:
            d1 = int(blk.doc_start.searchsorted(b, side="left"))
            if blk.bad[d0:d1].any():
                return None
            if segments:
                cuts = blk.doc_start[d0 + 1:d1] - a
                s = np.zeros(b - a, dtype=np.int32)
                s[cuts[cuts < b - a]] = 1
                segs.append(np.cumsum(s) + seg)
                seg = int(segs[-1][-1]) + 1
        parts.append(blk.flat[a:b])
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if not segments:
        return key, tokens
    return key, tokens, np.concatenate(segs).astype(np.int32)
