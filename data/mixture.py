"""Several datasets mixed by weight, deterministically.

The global order is a grid: global position g is row g // V of canonical stream g % V (V =
data.num_streams). With a mixture every row belongs to one dataset: a window of rows (whole
global batches, at least 256 rows) gives each dataset its share of rows (largest-remainder
rounding of weight x rows), the rows are shuffled by (seed, window), and inside each global
batch they are grouped by dataset, so a micro-batch rarely holds two objectives (span examples
are long, pairs short: mixing them in one micro-batch would be mostly padding). Row j of
dataset c is read from row count_c(j) of that dataset's own canonical streams, which run through
their own epochs independently. Every quantity depends on (seed, weights, V, global batch), never
on the number of ranks or workers, and count_c(j) is computed from the window alone: resuming
at any row costs nothing.

data.mixture in a config lists the datasets:
    mixture:
      - {source: /data/c4, weight: 0.7, objective: span}
      - {source: "pipe:curl -s https://host/wmt-{000..099}.tar", manifest: https://host/wmt/manifest.json,
         weight: 0.3, objective: pairs, name: wmt}
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from data.sources import DataError, resolve_source, source_manifest
from data.tokenizer import tokenizer_hash

KEYS = ("source", "weight", "objective", "manifest", "name")
MIN_WINDOW_ROWS = 256


@dataclass
class Component:
    """One dataset of the stream; a single-source stream has exactly one, with weight 1."""
    name: str
    shards: list
    objective: str
    weight: float = 1.0


def parse_mixture(entries, default_objective: str) -> list[dict]:
    """data.mixture entries -> validated dicts; ValueError names the bad key."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError("config key 'data.mixture': expected a non-empty list of {source, weight, ...}")
    out, names = [], set()
    for i, e in enumerate(entries):
        key = f"data.mixture[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"config key '{key}': expected a mapping with source and weight, got {e!r}")
        unknown = set(e) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown config key '{key}.{sorted(unknown)[0]}' (known: {', '.join(KEYS)})")
        if not isinstance(e.get("source"), str) or not e["source"]:
            raise ValueError(f"config key '{key}.source': missing or not a string")
        try:
            w = float(e.get("weight", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}.weight': cannot read {e.get('weight')!r} as float") from None
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"config key '{key}.weight': must be > 0, got {w}")
        obj = e.get("objective") or default_objective
        if obj not in ("span", "pairs", "ul2"):
            raise ValueError(f"config key '{key}.objective': must be span, pairs or ul2, got {obj!r}")
        name = str(e.get("name") or i)
        if name in names:
            raise ValueError(f"config key '{key}.name': duplicate name {name!r}")
        names.add(name)
        out.append({"source": e["source"], "weight": w, "objective": obj, "manifest": str(e.get("manifest") or ""),
                    "name": name})
    return out


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to weights (ties to the earlier dataset)."""
    exact = weights / weights.sum() * total
    n = np.floor(exact).astype(np.int64)
    short = total - int(n.sum())
    order = np.lexsort((np.arange(len(weights)), -(exact - n)))
    n[order[:short]] += 1
    return n


class Schedule:
    """Row j of the global grid -> (dataset c, row of dataset c)."""

    def __init__(self, weights: list[float], rows_per_batch: int, seed: int):
        self.R = rows_per_batch
        self.T = self.R * max(1, math.ceil(MIN_WINDOW_ROWS / self.R))      # rows per window
        self.n = largest_remainder(np.asarray(weights, dtype=np.float64), self.T)
        self.seed = seed
        self._cache = (None, None, None)

    def _window(self, w: int):
        if self._cache[0] != w:
            labels = np.repeat(np.arange(len(self.n)), self.n)
            labels = np.random.default_rng([self.seed, w, 7]).permutation(labels)
            labels = np.sort(labels.reshape(-1, self.R), axis=1).reshape(-1)   # grouped inside a batch
            before = np.zeros_like(labels)
            for c in range(len(self.n)):
                is_c = labels == c
                before[is_c] = np.arange(int(is_c.sum()))
            self._cache = (w, labels, before)
        return self._cache[1], self._cache[2]

    def locate(self, j: int) -> tuple[int, int]:
        w, o = divmod(j, self.T)
        labels, before = self._window(w)
        c = int(labels[o])
        return c, w * int(self.n[c]) + int(before[o])


# ----------------------------------------------------------------------------- from the config

def components_for(d, spec_path: str, shuffle: bool) -> list[Component]:
    """DataConfig + the source asked for (data.train / data.valid, or '' for data.mixture) -> datasets."""
    if spec_path:
        manifest = d.valid_manifest if (spec_path == d.valid and not shuffle) else d.train_manifest
        return [Component("", resolve_source(spec_path, manifest), d.objective)]
    if d.mixture and shuffle:
        return [Component(e["name"], resolve_source(e["source"], e["manifest"]), e["objective"], e["weight"])
                for e in parse_mixture(d.mixture, d.objective)]
    raise DataError("config key 'data.train': no training data given (set data.train or data.mixture)")


def find_tokenizer(d) -> str:
    """data.tokenizer, else tokenizer.json in data.train or in the first local mixture source that has one."""
    if d.tokenizer:
        return d.tokenizer
    candidates = [d.train] + [e.get("source", "") for e in (d.mixture or []) if isinstance(e, dict)]
    for c in candidates:
        path = os.path.join(c, "tokenizer.json") if c and os.path.isdir(c) else ""
        if path and os.path.isfile(path):
            return path
    raise DataError(f"config key 'data.tokenizer': no tokenizer.json found in {d.train or 'data.mixture'} "
                    "(give data.tokenizer, or run `encdec prepare` first)")


def check_data(d) -> tuple[list[Component], list[Component] | None]:
    """Resolves every configured source (shards exist, manifests readable) and checks that each was
    prepared with the run's tokenizer, before any process group: -> (training datasets, validation
    datasets or None)."""
    train = components_for(d, d.train, True)
    valid = components_for(d, d.valid, False) if d.valid else None
    check_tokenizers(d)
    return train, valid


def data_sources(d) -> list[tuple[str, str]]:
    """Every (source, manifest) the run reads: data.train or each data.mixture entry, and data.valid."""
    out = [(d.train, d.train_manifest)] if d.train else [(e["source"], e["manifest"])
                                                         for e in parse_mixture(d.mixture, d.objective)]
    return out + ([(d.valid, d.valid_manifest)] if d.valid else [])


def check_tokenizers(d) -> None:
    """Each source's manifest records its tokenizer's sha256: it must be the run's tokenizer's."""
    tok = find_tokenizer(d)
    tok = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
    try:
        want = tokenizer_hash(tok)
    except OSError as e:
        raise DataError(f"config key 'data.tokenizer': cannot read {tok} ({e.strerror})") from None
    for source, manifest in data_sources(d):
        url, man, _ = source_manifest(source, manifest)
        got = man.get("tokenizer_sha256")
        if isinstance(got, str) and got and got != want:
            raise DataError(f"{url} was prepared with another tokenizer than the run's {tok} "
                            f"(sha256 {got[:12]}... vs {want[:12]}...): prepare it with --tokenizer {tok}")
