"""Training objectives (the Objective interface; pairs and span corruption) and batch collation.

Objectives are registered by name in data/registry.py; data/ul2.py and data/bart.py hold the others.

Span corruption (T5): a fraction `noise_density` of the tokens, in spans of mean length
`mean_span_length`, is removed from the encoder input; each span is replaced by one sentinel,
and the target lists every sentinel followed by the tokens it hides, then </s>:
    tokens   a b c d e f g           (noise: c d, f)
    input    a b <X0> e <X1> g </s>
    target   <X0> c d <X1> f </s>
All randomness is one row of L-2 uniforms per example (L = its token count), drawn from a
generator the stream keys by (seed, dataset, epoch, global position), so a resumed run sees
byte-identical examples. The noise count is round(L * noise_density) (at least 1, at most L-1),
in round(noise / mean_span_length) spans; the spans and the kept runs between them are random
compositions (cut at the smallest uniforms). Packed examples all have the same L, so a loader
worker corrupts a whole micro-batch of them with one set of array operations
(span_corrupt_rows), which is what makes the stream fast; span_corrupt is the one-row case.
"""
from __future__ import annotations

import numpy as np
import torch

from data.sources import DataError
from data.tokenizer import EOS_ID, PAD_ID, SENTINEL_BASE

IGNORE = -100


def as_sentinel_ids(sentinels) -> np.ndarray:
    """A sentinel count (the ids SENTINEL_BASE.. of the project's own tokenizer) or the ids themselves
    (a Hugging Face tokenizer's <extra_id_N>, e.g. T5's from the end of the vocabulary) -> int32 ids."""
    if isinstance(sentinels, (int, np.integer)):
        return np.arange(SENTINEL_BASE, SENTINEL_BASE + int(sentinels), dtype=np.int32)
    return np.asarray(sentinels, dtype=np.int32)


def _counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens."""
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    return n_noise, max(1, min(int(round(n_noise / mean_span)), n_noise, length - n_noise))


def _compositions(u: np.ndarray, n: int) -> np.ndarray:
    """(B, m-1) uniforms -> (B, n) random positive run lengths summing to m (cuts at the n-1 smallest)."""
    B, m = u.shape[0], u.shape[1] + 1
    if n <= 1:
        return np.full((B, 1), m, dtype=np.int64)
    cuts = np.sort(np.argpartition(u, n - 2, axis=1)[:, :n - 1], axis=1) + 1
    return np.diff(cuts, axis=1, prepend=0, append=m)


def noise_spans_rows(length: int, density: float, mean_span: float, u: np.ndarray):
    """u (B, length-2) uniforms -> (starts, lengths), each (B, n_spans): the noise spans of each row.

    Spans and the kept runs between them alternate, every span preceded by kept tokens.
    """
    n_noise, n_spans = _counts(length, density, mean_span)
    noise = _compositions(u[:, :n_noise - 1], n_spans)
    keep = _compositions(u[:, n_noise - 1:length - 2], n_spans)
    return np.cumsum(keep, axis=1) + np.cumsum(noise, axis=1) - noise, noise


def span_corrupt_rows(rows: np.ndarray, density: float, mean_span: float, sentinels,
                      u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Span corruption of B equal-length rows at once; row i's noise comes from u[i] only.

    sentinels: the sentinel ids in order (<extra_id_0> first), or their count (as_sentinel_ids).
    rows (B, L) ids without </s>, u (B, L-2) uniforms in [0, 1) -> inputs (B, L - noise + spans + 1)
    and targets (B, noise + spans + 1), every row ending in </s>.
    """
    B, L = rows.shape
    starts, lens = noise_spans_rows(L, density, mean_span, u)
    n = starts.shape[1]
    n_noise = int(lens[0].sum())
    ids = as_sentinel_ids(sentinels)
    if n > len(ids):
        raise ValueError(f"{n} noise spans but only {len(ids)} sentinel tokens")
    sentinels = ids[:n]
    ar = np.arange(B)[:, None]
    before = np.cumsum(lens, axis=1) - lens                       # noise tokens before each span
    is_noise, keep = _noise_and_keep(B, L, starts, lens)
    # input: the ids with each span replaced by its sentinel, then </s>
    inp = np.empty((B, L + 1), dtype=np.int32)
    inp[:, :L] = rows
    inp[:, L] = EOS_ID
    inp[ar, starts] = sentinels
    # target: each sentinel followed by the tokens it hides, then </s>
    T = n_noise + n + 1
    tgt = np.empty((B, T), dtype=np.int32)
    at_sentinel = np.zeros((B, T), dtype=bool)
    at_sentinel[ar, before + np.arange(n)] = True
    tgt[at_sentinel] = np.tile(sentinels, B)
    at_sentinel[:, -1] = True
    tgt[~at_sentinel] = rows[is_noise]
    tgt[:, -1] = EOS_ID
    return inp[keep].reshape(B, L + 1 - n_noise + n), tgt


def _noise_and_keep(B: int, L: int, starts: np.ndarray, lens: np.ndarray):
    """(B, L) noise tokens, and (B, L + 1) input slots kept (non-noise, each span's first = its sentinel, </s>)."""
    n_noise = int(lens[0].sum())
    before = np.cumsum(lens, axis=1) - lens
    pos = np.repeat((starts - before).ravel(), lens.ravel()) + np.tile(np.arange(n_noise), B)
    is_noise = np.zeros((B, L), dtype=bool)
    is_noise[np.repeat(np.arange(B), n_noise), pos] = True
    keep = np.ones((B, L + 1), dtype=bool)
    keep[:, :L] = ~is_noise
    keep[np.arange(B)[:, None], starts] = True
    return is_noise, keep


def corrupted_segments(segs: np.ndarray, density: float, mean_span: float, u: np.ndarray) -> np.ndarray:
    """Document ids (B, L) of rows -> those of their span-corrupted inputs (same uniforms u as
    span_corrupt_rows): a sentinel belongs to the document of the first token it hides, </s> to the last."""
    B, L = segs.shape
    starts, lens = noise_spans_rows(L, density, mean_span, u)
    _, keep = _noise_and_keep(B, L, starts, lens)
    full = np.concatenate([segs, segs[:, -1:]], axis=1)
    return full[keep].reshape(B, -1).astype(np.int32)


def span_corrupt(ids: np.ndarray, density: float, mean_span: float, sentinels,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ids: tokens without the trailing </s>. Returns (input ids, target ids), both ending in </s>."""
    ids = np.asarray(ids, dtype=np.int32)
    if len(ids) < 2:
        first = as_sentinel_ids(sentinels)[:1]
        return np.append(ids, EOS_ID).astype(np.int32), np.append(first, EOS_ID).astype(np.int32)
    inp, tgt = span_corrupt_rows(ids[None], density, mean_span, sentinels, rng.random((1, len(ids) - 2)))
    return inp[0], tgt[0]


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


# ----------------------------------------------------------------------------- the objectives of this module

class Objective:
    """One training objective (its class registered by name in data/registry.py). The class says
    what holds for every run (its checks, the token ids it needs); an instance is the objective
    resolved against one stream (StreamSpec.objectives: its lengths and ids, checked up front),
    plain data, so it pickles into loader workers. The stream asks it, never its name.

    reads            "text": documents (prepared {"ids": [...]}, raw .txt or .json[text_field]), cut
                     into chunks; "pairs": (source, target) (prepared {"src", "tgt"}, raw src_field +
                     tgt_field), one example each
    needs_sentinels  the tokenizer must have <extra_id_N> tokens
    exact_packing    text with length indexes is packed without loss (data/packed.py); without them
                     chunk counts come per block (data/packing.py)
    segments         its packed examples may carry document ids (data.pack_attention)

    Randomness: an example's draws come from an RNG keyed by its position (start's keyed()), a
    block's from one keyed by the block (block_chunks' rng()), so the stream stays a function of
    the position on any layout.
    """
    name = ""
    reads = "text"
    needs_sentinels = True
    exact_packing = False
    segments = False

    @classmethod
    def check(cls, d, used: bool) -> list[tuple[str, str]]:
        """(key, problem) for its settings in the run's DataConfig `d` (used: some dataset trains
        with it); may fill in defaults, so the saved config is complete."""
        return []

    @classmethod
    def vocab(cls, tok, d):
        """What it needs of the run's tokenizer (ids), resolved once when it is used (Vocab.of(name));
        None = nothing. DataError names a setting the tokenizer cannot serve."""
        return None

    def __init__(self, spec):
        """Resolved against the spec: DataError for lengths or ids it cannot work with."""

    def check_target(self, spec) -> None:
        """DataError when its targets cannot fit data.max_tgt_len (once per dataset)."""

    def chunk_len(self) -> float:
        """Raw tokens of a chunk (its mean when chunks differ): exact packing and per-block chunk counts."""
        raise NotImplementedError

    def max_chunk(self) -> int:
        """Unpacked text: a document's tokens kept."""
        return int(self.chunk_len())

    def block_chunks(self, n: int, rng):
        """-> (raw length of each of a block's n chunks: one int or n, a tag per chunk appended to its
        item or None); rng() gives the block's keyed RNG."""
        return int(self.chunk_len()), None

    def start(self, spec, c: int, ex: dict, item: tuple, keyed):
        """Begins the example of one position of dataset c: item is the reader's ((key, tokens[, segment
        ids][, tag]) for text, (key, (src, tgt)) for pairs); keyed() is the example's RNG (re-keyed by
        the next example: every draw happens here). Sets ex["src"], ex["tgt"] and returns None, or
        returns what finish() completes together with the other examples of the batch."""
        raise NotImplementedError

    def finish(self, spec, pending: list) -> None:
        """Completes the examples start() returned, all at once."""


class Pairs(Objective):
    """Source -> target pairs as they are."""
    name, reads, needs_sentinels = "pairs", "pairs", False

    def start(self, spec, c, ex, item, keyed):
        ex["src"], ex["tgt"] = item[1]


class SpanCorruption(Objective):
    """T5 span corruption (module docstring) at data.noise_density, data.mean_span_length; chunks of
    spec.raw_len tokens fill data.max_src_len."""
    name, exact_packing, segments = "span", True, True

    def __init__(self, spec):
        self.raw_len = spec.raw_len

    def chunk_len(self) -> int:
        return self.raw_len

    def check_target(self, spec) -> None:
        need = span_target_length(spec.max_src_len, spec.noise_density, spec.mean_span_length)
        if need > spec.max_tgt_len:
            raise DataError(f"data.max_tgt_len={spec.max_tgt_len} is shorter than the span-corruption "
                            f"target ({need} tokens for data.max_src_len={spec.max_src_len})")

    def start(self, spec, c, ex, item, keyed):
        rng = keyed()
        seg = item[2] if spec.pack_attention and len(item) > 2 else None
        if spec.geometry[c].packed and len(item[1]) == self.raw_len:     # full rows: corrupted together
            return ex, item[1], rng.random(len(item[1]) - 2), seg
        ex["src"], ex["tgt"] = span_corrupt(item[1], spec.noise_density, spec.mean_span_length, spec.sentinels, rng)
        if seg is not None:                                              # the same uniforms again, for the segments
            u = keyed().random((1, max(0, len(seg) - 2)))
            ex["segments"] = (corrupted_segments(seg[None], spec.noise_density, spec.mean_span_length, u)[0]
                              if len(seg) >= 2 else np.append(seg, seg[-1]))

    def finish(self, spec, pending: list) -> None:
        u = np.stack([p[2] for p in pending])
        src, tgt = span_corrupt_rows(np.stack([p[1] for p in pending]), spec.noise_density, spec.mean_span_length,
                                     spec.sentinels, u)
        for (ex, _, _, _), x, y in zip(pending, src, tgt):
            ex["src"], ex["tgt"] = x, y
        if spec.pack_attention:
            segs = corrupted_segments(np.stack([p[3] for p in pending]), spec.noise_density,
                                      spec.mean_span_length, u)
            for (ex, _, _, _), sg in zip(pending, segs):
                ex["segments"] = sg



# ----------------------------------------------------------------------------- batches

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
