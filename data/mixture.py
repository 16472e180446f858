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

data.mixture in a config lists the datasets (data/config.py: MixtureEntry; data/resolve.py finds them):
    mixture:
      - {source: /data/c4, weight: 0.7, objective: span}
      - {source: "pipe:curl -s https://host/wmt-{000..099}.tar", manifest: https://host/wmt/manifest.json,
         weight: 0.3, objective: pairs, name: wmt}
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data.rawtext import RawText

MIN_WINDOW_ROWS = 256


@dataclass
class Component:
    """One dataset of the stream; a single-source stream has exactly one, with weight 1."""
    name: str
    shards: list
    objective: str
    weight: float = 1.0
    raw: RawText | None = None      # raw text samples, tokenized by the loader (None: token ids, as prepared)


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
