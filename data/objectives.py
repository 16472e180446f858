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
    if n_segments <= 1:
        return np.array([total], dtype=np.int64)
    cuts = np.sort(rng.choice(total - 1, size=n_segments - 1, replace=False)) + 1
    out = np.empty(n_segments, dtype=np.int64)
    out[0], out[-1] = cuts[0], total - cuts[-1]
    out[1:-1] = cuts[1:] - cuts[:-1]
    return out


def _counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    return n_noise, max(1, min(int(round(n_noise / mean_span)), n_noise, length - n_noise))


def noise_spans(length: int, density: float, mean_span: float, rng: np.random.Generator):
    """-> (start, length) of each noise span, in order; every span is preceded by kept tokens."""
    n_noise, n_spans = _counts(length, density, mean_span)
    noise_lens = _segment(n_noise, n_spans, rng)
    keep_lens = _segment(length - n_noise, n_spans, rng)
    # interleave: keep, noise, keep, noise, ...
    noise_before = np.cumsum(noise_lens) - noise_lens
    return np.cumsum(keep_lens) + noise_before, noise_lens


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    starts, lens = noise_spans(length, density, mean_span, rng)
    mask = np.zeros(length, dtype=bool)
    mask[_span_positions(starts, lens)] = True
    return mask


def _span_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    before = np.cumsum(lens) - lens                                # noise tokens before each span
    return np.repeat(starts - before, lens) + np.arange(int(before[-1] + lens[-1]))


def span_corrupt(ids: np.ndarray, density: float, mean_span: float, n_sentinels: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ids: tokens without the trailing </s>. Returns (input ids, target ids), both ending in </s>."""
    ids = np.asarray(ids, dtype=np.int32)
    L = len(ids)
    if L < 2:
        return np.append(ids, EOS_ID).astype(np.int32), np.array([SENTINEL_BASE, EOS_ID], dtype=np.int32)
    starts, lens = noise_spans(L, density, mean_span, rng)
    n, n_noise = len(starts), int(lens.sum())
    if n > n_sentinels:
        raise ValueError(f"{n} noise spans but only {n_sentinels} sentinel tokens")
    sentinels = np.arange(SENTINEL_BASE, SENTINEL_BASE + n, dtype=np.int32)
    pos = _span_positions(starts, lens)
    # input: the ids with each span replaced by its sentinel, then </s>
    keep = np.ones(L + 1, dtype=bool)
    keep[pos] = False
    keep[starts] = True
    inp = np.empty(L + 1, dtype=np.int32)
    inp[:L] = ids
    inp[starts] = sentinels
    inp[L] = EOS_ID
    # target: each sentinel followed by the tokens it hides, then </s>
    tgt = np.empty(n_noise + n + 1, dtype=np.int32)
    at_sentinel = np.zeros(n_noise + n + 1, dtype=bool)
    at_sentinel[np.cumsum(lens) - lens + np.arange(n)] = True
    tgt[at_sentinel] = sentinels
    at_sentinel[-1] = True
    tgt[~at_sentinel] = ids[pos]
    tgt[-1] = EOS_ID
    return inp[keep], tgt


def span_target_length(input_len: int, density: float, mean_span: float) -> int:
    """Target length (sentinels + noise + </s>) of a packed example with raw_length_for(input_len) tokens."""
    noise, spans = _counts(raw_length_for(input_len, density, mean_span), density, mean_span)
    return noise + spans + 1


def raw_length_for(input_len: int, density: float, mean_span: float) -> int:
    """Longest raw token count whose corrupted input (with sentinels and </s>) fits input_len."""
    n = int(input_len / (1 - density + density / mean_span)) + 4      # upper bound: work downwards
    while n > 2:
        noise, spans = _counts(n, density, mean_span)
        if n - noise + spans + 1 <= input_len:
            return n
        n -= 1
    return 2


def placeholder(key: str = "") -> dict:
    """A sample that keeps a batch slot filled but carries no loss (all labels ignored)."""
    return {"key": key, "src": np.array([EOS_ID], np.int32), "tgt": np.array([EOS_ID], np.int32), "ignore": True}


def collate(samples: list[dict], max_src: int, max_tgt: int, decoder_start: int = PAD_ID) -> dict:
    """List of {"src": ids, "tgt": ids} (numpy, each ending in </s>) -> padded tensors.

    src (B, S) / src_mask (B, S) bool / tgt_in (B, T) = [start] + tgt[:-1] / labels (B, T), -100 on padding.
    S and T are the longest lengths in this batch (capped), so short batches cost less. A sample
    with "ignore" (a placeholder) has every label at -100. pad_frac: the share of the B*(S+T)
    token slots that are padding or placeholders; n_real: (source, target) tokens that count.
    """
    B = len(samples)
    srcs = [s["src"][:max_src] for s in samples]
    tgts = [s["tgt"][:max_tgt] for s in samples]
    S, T = max(len(x) for x in srcs), max(len(x) for x in tgts)
    src = np.full((B, S), PAD_ID, dtype=np.int64)
    src_mask = np.zeros((B, S), dtype=bool)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    tgt_in = np.full((B, T), PAD_ID, dtype=np.int64)
    tgt_in[:, 0] = decoder_start
    n_src = n_tgt = 0
    for i, (x, y, smp) in enumerate(zip(srcs, tgts, samples)):
        src[i, :len(x)] = x
        src_mask[i, :len(x)] = True
        tgt_in[i, 1:len(y)] = y[:-1]
        if not smp.get("ignore"):
            labels[i, :len(y)] = y
            n_src, n_tgt = n_src + len(x), n_tgt + len(y)
    return {"src": torch.from_numpy(src), "src_mask": torch.from_numpy(src_mask), "tgt_in": torch.from_numpy(tgt_in),
            "labels": torch.from_numpy(labels), "keys": [s["key"] for s in samples],
            "pad_frac": 1.0 - (n_src + n_tgt) / (B * (S + T)), "n_real": (n_src, n_tgt)}
