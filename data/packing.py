"""Packing documents into full-length examples (folders without length indexes), and length bucketing of pairs.

Prepared text has length indexes and is packed without loss by data/packed.py; what follows is the
fallback for folders prepared before them (`python -m data.index DIR` adds them).

Packing (span corruption). A canonical stream is read in shuffle blocks of B documents. The
documents of a block (in their shuffled order, each without its </s>) are laid end to end and cut
into exactly K = chunks_per_block(...) chunks of `raw_len` tokens, where K comes from the block's
document count and the dataset's mean document length (the manifest's token count), never from
the block's content. So the number of examples an epoch has is known before any data is read,
and it is the same in every stream: every rank yields the same number of batches, and the
example at a global position is found by reading one block. The price: a block whose documents
hold more than K * raw_len tokens loses its tail, one that holds fewer starts again from its
beginning to fill the last chunk(s); both are counted (a few percent for blocks of ~1000
documents). A document longer than raw_len spans several chunks.

Bucketing (pairs). Samples per global batch stay fixed; inside a window of `bucket_window` global
batches, each canonical stream sorts its own samples of the window by length and hands them out
so that global batch k of the window gets the k-th length range of every stream (the window's
batches in a seeded random order). Each global batch is then made of similar lengths, so every
micro-batch on every rank pads little, and which samples form a global batch depends on the
streams only, never on the number of ranks or workers.
"""
from __future__ import annotations

import numpy as np


def mean_doc_tokens(shards) -> float:
    """Mean tokens per document without its </s>, from the manifest; 0 if the manifest has no counts."""
    n = sum(s.num_samples for s in shards)
    t = sum(s.num_tokens for s in shards)
    if n == 0 or any(s.num_tokens <= 0 for s in shards if s.num_samples):
        return 0.0
    return max(t / n - 1.0, 1.0)


def chunks_per_block(n_docs: int, mean_tokens: float, raw_len: int) -> int:
    return max(1, int(round(n_docs * mean_tokens / raw_len)))


def pack_block(docs: list, keys: list[str], n_chunks: int, raw_len):
    """Documents (token arrays, or None for a bad one) -> n_chunks (key, tokens) and (dropped, repeated) counts.

    raw_len: one length for every chunk, or one per chunk (UL2: each its denoiser's).
    A chunk's key is "<first document's key>@<token offset in it>".
    """
    good = [(k, d) for k, d in zip(keys, docs) if d is not None and len(d)]
    lengths = np.broadcast_to(np.asarray(raw_len, dtype=np.int64), (n_chunks,))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    need = int(offsets[-1])
    if not good:
        return [None] * n_chunks, (0, 0)
    lens = np.array([len(d) for _, d in good])
    flat = np.concatenate([d for _, d in good]).astype(np.int32)
    total = len(flat)
    if total < need:                                   # short block: start again from its beginning
        flat = np.tile(flat, -(-need // total))
    starts_of_doc = np.concatenate([[0], np.cumsum(lens)])
    chunks = []
    for c in range(n_chunks):
        a = int(offsets[c])
        first = a % total
        d = int(np.searchsorted(starts_of_doc, first, side="right") - 1)
        chunks.append((f"{good[d][0]}@{first - starts_of_doc[d]}", flat[a:int(offsets[c + 1])]))
    return chunks, (max(0, total - need), max(0, need - total))


def bucket_assign(lengths: np.ndarray, epochs: np.ndarray, batch_of_slot: np.ndarray, batch_rank: dict):
    """Which window item goes to which slot.

    The window's slots (positions, in order) would take items 0..n-1 in order; item t's epoch is
    epochs[t], slot t belongs to global batch batch_of_slot[t], and batch_rank gives each batch its
    length rank (a permutation of the window's batches). Returns a with slot t -> item a[t]: the
    items sorted by (epoch, length, index) fill the slots sorted by (epoch, batch rank, index), so
    every epoch keeps exactly its own items.
    """
    n = len(lengths)
    idx = np.arange(n)
    rank = np.array([batch_rank[b] for b in batch_of_slot], dtype=np.int64)
    slots = np.lexsort((idx, rank, epochs))
    items = np.lexsort((idx, lengths, epochs))
    a = np.empty(n, dtype=np.int64)
    a[slots] = items
    return a
