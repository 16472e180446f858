"""Training objectives and batch collation.

Span corruption (T5): a fraction `noise_density` of the tokens, in spans of mean length
`mean_span_length`, is removed from the encoder input; each span is replaced by one sentinel,
and the target lists every sentinel followed by the tokens it hides, then </s>:
    tokens   a b c d e f g           (noise: c d, f)
    input    a b <X0> e <X1> g </s>
    target   <X0> c d <X1> f </s>
All randomness comes from the generator passed in, which the stream seeds by
(seed, epoch, global sample index) so any resumed run sees byte-identical examples.
"""
from __future__ import annotations

import numpy as np
import torch

from data.tokenizer import EOS_ID, PAD_ID, SENTINEL_BASE

IGNORE = -100


def _segment(total: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Random split of `total` items into `n_segments` non-empty runs (lengths)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=n_segments - 1, replace=False)) if n_segments > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    n_noise = int(round(length * density))
    n_noise = min(max(n_noise, 1), length - 1)
    n_spans = max(1, min(int(round(n_noise / mean_span)), n_noise, length - n_noise))
    noise_lens = _segment(n_noise, n_spans, rng)
    keep_lens = _segment(length - n_noise, n_spans, rng)
    # interleave: keep, noise, keep, noise, ... (every span is preceded by kept tokens)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for k, n in zip(keep_lens, noise_lens):
        pos += k
        mask[pos:pos + n] = True
        pos += n
    return mask


def span_corrupt(ids: np.ndarray, density: float, mean_span: float, n_sentinels: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ids: tokens without the trailing </s>. Returns (input ids, target ids), both ending in </s>."""
    if len(ids) < 2:
        return np.append(ids, EOS_ID).astype(np.int32), np.array([SENTINEL_BASE, EOS_ID], dtype=np.int32)
    mask = noise_mask(len(ids), density, mean_span, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_id = np.cumsum(starts) - 1
    if span_id.max() >= n_sentinels:
        raise ValueError(f"{span_id.max() + 1} noise spans but only {n_sentinels} sentinel tokens")
    inp = np.where(starts, SENTINEL_BASE + span_id, ids)[~mask | starts]
    # the target: each sentinel, then the tokens of its span
    out, s = [], 0
    for is_start, tok in zip(starts[mask], ids[mask]):
        if is_start:
            out.append(SENTINEL_BASE + s)
            s += 1
        out.append(tok)
    return (np.append(inp, EOS_ID).astype(np.int32), np.array(out + [EOS_ID], dtype=np.int32))


def raw_length_for(input_len: int, density: float, mean_span: float) -> int:
    """Longest raw token count whose corrupted input (with sentinels and </s>) fits input_len."""
    n = input_len
    while n > 2:
        noise = int(round(n * density))
        spans = max(1, int(round(noise / mean_span)))
        if n - noise + spans + 1 <= input_len:
            return n
        n -= 1
    return 2


def collate(samples: list[dict], max_src: int, max_tgt: int, decoder_start: int = PAD_ID) -> dict:
    """List of {"src": ids, "tgt": ids} (numpy, each ending in </s>) -> padded tensors.

    src (B, S) / src_mask (B, S) bool / tgt_in (B, T) = [start] + tgt[:-1] / labels (B, T), -100 on padding.
    S and T are the longest lengths in this batch (capped), so short batches cost less.
    """
    B = len(samples)
    srcs = [s["src"][:max_src] for s in samples]
    tgts = [s["tgt"][:max_tgt] for s in samples]
    S, T = max(len(x) for x in srcs), max(len(x) for x in tgts)
    src = np.full((B, S), PAD_ID, dtype=np.int64)
    src_mask = np.zeros((B, S), dtype=bool)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    tgt_in = np.full((B, T), PAD_ID, dtype=np.int64)
    for i, (x, y) in enumerate(zip(srcs, tgts)):
        src[i, :len(x)] = x
        src_mask[i, :len(x)] = True
        labels[i, :len(y)] = y
        tgt_in[i, 0] = decoder_start
        tgt_in[i, 1:len(y)] = y[:-1]
    return {"src": torch.from_numpy(src), "src_mask": torch.from_numpy(src_mask), "tgt_in": torch.from_numpy(tgt_in),
            "labels": torch.from_numpy(labels), "keys": [s["key"] for s in samples]}
