"""The UL2 objective (data.objective=ul2): a mixture of denoisers over monolingual text.

Each example is made by one denoiser of a table (data.ul2), picked by weight:
    span    T5 span corruption with its own (mean span length, noise density): the R-denoisers
            (short spans, low rate) and the X-denoisers (long spans or a high rate);
    prefix  the S-denoiser (prefix LM): the row is cut in two, the input is the prefix, the
            target the continuation; the target's share of the row is uniform in (0, 2 x density],
            so its mean is the density. A prefix longer than the input keeps its last tokens.
The denoiser's mode token ([NLU], [NLG], [S2S], any token of the tokenizer, or none) starts the
input, so the model knows which task it is solving.

Determinism. Packed (data.pack, the default): each shuffle block of a stream is cut into chunks
whose raw lengths are those of their denoisers (each fills data.max_src_len after corruption);
the denoisers of a block's K chunks are drawn by an RNG keyed by (seed, dataset, epoch, stream,
block), K from the manifest and the table's mean raw length, so the epoch's size is still known
before reading. Unpacked: the denoiser is the first draw of the example's own keyed RNG. The noise
of every example comes from the RNG keyed by (seed, dataset, epoch, position), as for span: the
stream stays a function of the position only, exactly resumable on any layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.objectives import Objective, _counts, as_sentinel_ids, raw_length_for, span_corrupt_rows, span_target_length
from data.sources import DataError
from data.tokenizer import EOS_ID

KINDS = ("span", "prefix")


@dataclass
class Denoiser:
    name: str = "R"
    kind: str = "span"               # span | prefix
    mean_span_length: float = 3.0    # span only
    noise_density: float = 0.15      # span: share of tokens masked; prefix: mean share given to the target
    mode: str = "[NLU]"              # token starting the input ("" = none)
    weight: float = 1.0


def default_table() -> list[Denoiser]:
    """The UL2 paper's mixture (R: mu 3/8 at 15%; X: mu 3/8 at 50%, mu 64 at 15%/50%; S: prefix LM),
    the S-denoiser weighted to about a quarter of the examples."""
    r = [Denoiser("R", "span", m, 0.15, "[NLU]") for m in (3.0, 8.0)]
    x = [Denoiser("X", "span", m, d, "[NLG]") for m, d in ((3.0, 0.5), (8.0, 0.5), (64.0, 0.15), (64.0, 0.5))]
    return r + x + [Denoiser("S", "prefix", 1.0, 0.25, "[S2S]", weight=2.0)]


def parse_table(entries) -> list[Denoiser]:
    """data.ul2 (Denoisers or dicts from YAML; empty = default_table()) -> validated Denoisers.

    ValueError names the key, e.g. data.ul2[2].noise_density.
    """
    if not entries:
        return default_table()
    out = []
    fields = set(Denoiser.__dataclass_fields__)
    for i, e in enumerate(entries):
        key = f"data.ul2[{i}]"
        if isinstance(e, dict):
            unknown = set(e) - fields
            if unknown:
                raise ValueError(f"unknown config key '{key}.{sorted(unknown)[0]}' (known: {', '.join(sorted(fields))})")
            e = Denoiser(**e)
        if not isinstance(e, Denoiser):
            raise ValueError(f"config key '{key}': expected a mapping (name, kind, ...), got {e!r}")
        if e.kind not in KINDS:
            raise ValueError(f"config key '{key}.kind': must be span or prefix, got {e.kind!r}")
        checks = [("noise_density", 0 < float(e.noise_density) < (1 if e.kind == "span" else 0.5)),
                  ("mean_span_length", float(e.mean_span_length) >= 1), ("weight", float(e.weight) > 0)]
        for f, ok in checks:
            if not ok:
                raise ValueError(f"config key '{key}.{f}': {getattr(e, f)!r} is out of range")
        out.append(e)
    return out


def mode_ids(table: list[Denoiser], token_to_id) -> list[int]:
    """Mode token of each denoiser -> its id (-1 for none); DataError names a token the tokenizer lacks."""
    out = []
    for i, d in enumerate(table):
        if not d.mode:
            out.append(-1)
            continue
        t = token_to_id(d.mode)
        if t is None:
            raise DataError(f"config key 'data.ul2[{i}].mode': token {d.mode!r} is not in the tokenizer "
                            "(add it with `encdec prepare --add-tokens`, or set mode to '' or an existing token)")
        out.append(int(t))
    return out


class Plan:
    """The table resolved against the lengths: each denoiser's raw row length, checked up front."""

    def __init__(self, table: list[Denoiser], modes: list[int], max_src: int, max_tgt: int, n_sentinels: int):
        self.table, self.modes = table, list(modes) or [-1] * len(table)
        w = np.array([d.weight for d in table], dtype=np.float64)
        self.p = w / w.sum()
        self.raw, self.src_room = [], []
        for i, (d, m) in enumerate(zip(table, self.modes)):
            room = max_src - (m >= 0)                     # input tokens after the mode token (incl. </s>)
            if d.kind == "span":
                raw = raw_length_for(room, d.noise_density, d.mean_span_length)
                need = span_target_length(room, d.noise_density, d.mean_span_length)
                spans = _counts(raw, d.noise_density, d.mean_span_length)[1]
                if spans > n_sentinels:
                    raise DataError(f"config key 'data.ul2[{i}]': {spans} noise spans per example but the tokenizer "
                                    f"has {n_sentinels} sentinels (lower data.max_src_len or the noise density)")
            else:
                raw = int(round((room - 1) / (1 - d.noise_density)))
                need = int(np.floor(2 * d.noise_density * raw)) + 1
            if need > max_tgt:
                raise DataError(f"config key 'data.ul2[{i}]': the {d.name} denoiser needs targets of {need} tokens, "
                                f"data.max_tgt_len={max_tgt}")
            self.raw.append(raw)
            self.src_room.append(room)
        self.mean_raw = float(np.dot(self.p, self.raw))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.table), size=n, p=self.p)

    def noise(self, d: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """The uniforms one example of denoiser d over `length` tokens uses (drawn now: rng is re-keyed)."""
        return rng.random(max(length - 2, 1) if self.table[d].kind == "span" else 1)

    def examples(self, rows: list[np.ndarray], ds: list[int], noise: list[np.ndarray], sentinels) -> list[tuple]:
        """Rows (each of its denoiser's raw length, or shorter when unpacked) -> (input, target) per row.

        noise[i]: row i's uniforms (Plan.noise); span rows of one denoiser and one length are corrupted together.
        """
        out: list = [None] * len(rows)
        groups: dict = {}
        for i, (row, d) in enumerate(zip(rows, ds)):
            if self.table[d].kind == "prefix":
                out[i] = self._prefix(row, d, float(noise[i][0]))
            elif len(row) < 2:
                out[i] = (self._with_mode(np.append(row, EOS_ID).astype(np.int32), d),
                          np.append(as_sentinel_ids(sentinels)[:1], EOS_ID).astype(np.int32))
            else:
                groups.setdefault((d, len(row)), []).append(i)
        for (d, L), idx in groups.items():
            den = self.table[d]
            u = np.stack([noise[i][:L - 2] for i in idx])
            src, tgt = span_corrupt_rows(np.stack([rows[i] for i in idx]), den.noise_density, den.mean_span_length,
                                         sentinels, u)
            for i, x, y in zip(idx, src, tgt):
                out[i] = (self._with_mode(x, d), y)
        return out

    def _with_mode(self, x: np.ndarray, d: int) -> np.ndarray:
        m = self.modes[d]
        return x if m < 0 else np.concatenate([[m], x]).astype(np.int32)

    def _prefix(self, row: np.ndarray, d: int, u: float):
        """Target: the last s tokens, s uniform in [1, 2 x density x L]; input: the prefix's last tokens that fit."""
        L = len(row)
        hi = max(1, min(L - 1, int(np.floor(2 * self.table[d].noise_density * L))))
        s = min(1 + int(u * hi), hi) if L > 1 else 0
        keep = self.src_room[d] - 1
        prefix = row[:L - s][max(0, L - s - keep):]
        return (self._with_mode(np.append(prefix, EOS_ID).astype(np.int32), d),
                np.append(row[L - s:], EOS_ID).astype(np.int32))


class UL2(Objective):
    """The objective data.objective=ul2: the table data.ul2 (its default: default_table()) resolved
    into a Plan; packed chunks are tagged with their denoiser (keyed by the block), unpacked
    examples draw theirs first from their own RNG."""
    name = "ul2"

    @classmethod
    def check(cls, d, used: bool) -> list[tuple[str, str]]:
        if not (d.ul2 or used):
            return []
        try:
            d.ul2 = parse_table(d.ul2)
        except ValueError as e:                          # the message names data.ul2[i].field
            key, _, msg = str(e).partition(": ")
            return [(key.split("'")[1] if "'" in key else "data.ul2", msg or str(e))]
        return []

    @classmethod
    def vocab(cls, tok, d) -> tuple:
        return tuple(mode_ids(d.ul2 or default_table(), tok.token_to_id))

    def __init__(self, spec):
        self.plan = Plan(spec.data.ul2 or default_table(), list(spec.vocab.of(self.name)), spec.max_src_len,
                         spec.max_tgt_len, len(spec.sentinels))

    def chunk_len(self) -> float:
        return self.plan.mean_raw

    def max_chunk(self) -> int:
        return max(self.plan.raw)

    def block_chunks(self, n: int, rng):
        ds = self.plan.draw(rng(), n)                     # each chunk its denoiser's length
        return [self.plan.raw[d] for d in ds], ds

    def start(self, spec, c, ex, item, keyed):
        rng, plan = keyed(), self.plan
        d = item[2] if spec.geometry[c].packed else int(plan.draw(rng, 1)[0])
        row = item[1][:plan.raw[d]]
        ex["denoiser"] = d
        return ex, row, d, plan.noise(d, len(row), rng)

    def finish(self, spec, pending: list) -> None:
        made = self.plan.examples([p[1] for p in pending], [p[2] for p in pending], [p[3] for p in pending],
                                  spec.sentinels)
        for (ex, *_), (x, y) in zip(pending, made):
            ex["src"], ex["tgt"] = x, y
