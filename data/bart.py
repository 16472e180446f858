"""BART's pretraining objective (data.objective=bart): text infilling and sentence permutation.

A chunk of text (documents packed end to end, data.max_src_len - 1 tokens; exact packing with
length indexes, so every token is used) becomes
    target  the chunk as it is, then </s>
    source  its sentences shuffled (a sentence ends after a token whose text ends in . ! or ?),
            then spans masked: span lengths drawn from Poisson(data.bart.poisson_lambda) until
            round(data.bart.mask_ratio x L) tokens are covered (the last one cut to fit), each span
            replaced by ONE mask token; a span of length 0 inserts a mask. Then </s>.
    chunk    a b c . d e ! f g h ?
    permuted f g h ? a b c . d e !          (sentences 3 1 2)
    source   f <M> ? a <M> b c . d <M> e ! </s>    (spans: g h | insert | e !... as drawn)
The spans and the kept runs between them alternate (consecutive spans are kept apart, so each
is its own mask), the kept runs a random composition. The source is never longer than the chunk
plus </s> (0-length spans beyond what the masked tokens pay for are dropped), so it fits
data.max_src_len; the target (max_src_len tokens) must fit data.max_tgt_len.

The mask token is the tokenizer's <mask> if it has one, else its <extra_id_0>; it and the
sentence-end ids are resolved once from the tokenizer. All randomness of an example comes from
its position-keyed RNG (sentence order, span lengths, kept runs, in that order): a resumed run on
any layout sees byte-identical examples. BART's other noises (token deletion, document rotation,
random-token replacement of masks) are not built.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.objectives import Objective
from data.sources import DataError
from data.tokenizer import EOS_ID, sentinel_ids

MASK = "<mask>"
SENTENCE_ENDS = (".", "!", "?")


@dataclass
class BartNoise:
    """data.bart: the noise of objective bart (defaults: BART's)."""
    mask_ratio: float = 0.3          # share of each chunk's tokens masked
    poisson_lambda: float = 3.0      # span lengths ~ Poisson(lambda); a 0-length span inserts a mask
    permute_sentences: bool = True   # shuffle the sentences of every source


def sentence_end_ids(tok) -> list[int]:
    """Ids of the tokenizer's (non-special) tokens whose text ends a sentence."""
    special = set(tok.get_added_tokens_decoder())
    return sorted(i for t, i in tok.get_vocab().items() if t.endswith(SENTENCE_ENDS) and i not in special)


def permute_sentences(x: np.ndarray, is_end: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x with its sentences (each ending after a True of is_end; the last one may end without) shuffled."""
    sentence = np.concatenate([[0], np.cumsum(is_end[:-1])])      # sentence number of each token
    n = int(sentence[-1]) + 1
    if n == 1:
        return x
    place = np.empty(n, dtype=np.int64)
    place[rng.permutation(n)] = np.arange(n)                     # sentence perm[j] goes to place j
    return x[np.argsort(place[sentence], kind="stable")]


def span_lengths(n_noise: int, n_keep: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) span lengths (in order) covering exactly n_noise tokens; 0 = an inserted mask.

    At most n_keep + 1 spans (the kept runs between them are >= 1 token) and at most n_noise of
    them (the source never grows): extra nonzero spans are merged into the last one kept, extra
    0-length spans dropped (both rare at BART's settings).
    """
    lens = np.zeros(0, dtype=np.int64)
    while lens.sum() < n_noise:
        lens = np.concatenate([lens, rng.poisson(lam, size=n_noise)])
    cum = np.cumsum(lens)
    last = int(np.searchsorted(cum, n_noise))                 # first span reaching the budget
    lens = lens[:last + 1]
    lens[last] = n_noise - (cum[last - 1] if last else 0)     # cut to fit (>= 1)
    nz = np.flatnonzero(lens)
    if len(nz) > n_keep + 1:                                  # too many to keep apart: merge the tail
        lens[nz[n_keep]] += lens[nz[n_keep + 1:]].sum()
        lens = np.delete(lens, nz[n_keep + 1:])
        nz = np.flatnonzero(lens)
    zeros = np.flatnonzero(lens == 0)
    room = min(n_noise, n_keep + 1) - len(nz)
    return np.delete(lens, zeros[max(room, 0):])


def infill(x: np.ndarray, mask_ratio: float, lam: float, mask_id: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Text infilling of x (L,) -> (source without </s>, span lengths in order)."""
    L = len(x)
    n_noise = min(int(round(L * mask_ratio)), L - 1) if L > 1 else 0
    if n_noise <= 0:
        return x, np.zeros(0, dtype=np.int64)
    keep = L - n_noise
    lens = span_lengths(n_noise, keep, lam, rng)
    n = len(lens)
    # kept runs g_0 .. g_n (inner ones >= 1): a uniform weak composition of keep - (n - 1), by bars
    bars = np.sort(rng.choice(keep + 1, size=n, replace=False))
    runs = np.diff(np.concatenate([[-1], bars, [keep + 1]])) - 1
    runs[1:n] += 1
    starts = np.cumsum(runs[:n]) + np.cumsum(lens) - lens        # first noise token of each span in x
    noise = np.zeros(L, dtype=bool)
    noise[np.repeat(starts, lens) + (np.arange(n_noise) - np.repeat(np.cumsum(lens) - lens, lens))] = True
    src = np.insert(x[~noise], np.cumsum(runs[:n]), mask_id)    # each span's mask after the kept tokens before it
    return src, lens


class Bart(Objective):
    """The objective data.objective=bart (module docstring): chunks of data.max_src_len - 1 tokens."""
    name, needs_sentinels, exact_packing = "bart", False, True

    @classmethod
    def check(cls, d, used: bool) -> list[tuple[str, str]]:
        b, bad = d.bart, []
        if not 0 < b.mask_ratio < 1:
            bad.append(("data.bart.mask_ratio", f"must be in (0, 1), got {b.mask_ratio}"))
        if not b.poisson_lambda > 0:
            bad.append(("data.bart.poisson_lambda", f"must be > 0, got {b.poisson_lambda}"))
        return bad

    @classmethod
    def vocab(cls, tok, d) -> tuple:
        """(mask id, sentence-end ids...): <mask>, else <extra_id_0>."""
        mask = tok.token_to_id(MASK)
        if mask is None:
            first = sentinel_ids(tok)[:1]
            if not first:
                raise DataError("data.objective=bart needs a mask token, and the tokenizer has neither <mask> "
                                "nor <extra_id_0> (add one with `encdec prepare --add-tokens '<mask>'`)")
            mask = first[0]
        ends = sentence_end_ids(tok)
        if d.bart.permute_sentences and not ends:
            raise DataError("config key 'data.bart.permute_sentences': no token of the tokenizer ends a "
                            f"sentence ({' '.join(SENTENCE_ENDS)}); set it to false")
        return (int(mask), *ends)

    def __init__(self, spec):
        ids = spec.vocab.of(self.name)
        if not ids:
            raise DataError("data.objective=bart: the tokenizer's mask token was not resolved (vocab_of)")
        self.mask_id, self.ends = ids[0], np.array(ids[1:], dtype=np.int32)
        self.noise = spec.data.bart
        self.raw_len = spec.max_src_len - 1                  # the chunk and </s> fill the source, unmasked

    def chunk_len(self) -> int:
        return self.raw_len

    def check_target(self, spec) -> None:
        if spec.max_tgt_len < self.raw_len + 1:
            raise DataError(f"data.max_tgt_len={spec.max_tgt_len} is shorter than the bart target (the "
                            f"original chunk and </s>: {self.raw_len + 1} tokens for data.max_src_len="
                            f"{spec.max_src_len}); set data.max_tgt_len >= data.max_src_len")

    def example(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One chunk (no </s>) -> (source, target), both ending in </s>."""
        x = np.asarray(tokens, dtype=np.int32)
        tgt = np.append(x, EOS_ID).astype(np.int32)
        if self.noise.permute_sentences and len(x) > 1:
            x = permute_sentences(x, np.isin(x, self.ends), rng)
        src, _ = infill(x, self.noise.mask_ratio, self.noise.poisson_lambda, self.mask_id, rng)
        return np.append(src, EOS_ID).astype(np.int32), tgt

    def start(self, spec, c, ex, item, keyed):
        ex["src"], ex["tgt"] = self.example(item[1], keyed())
