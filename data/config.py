"""The data settings of a run (the `data:` section of a config): one typed dataclass, one set of defaults.

launcher/config.py loads it from YAML with the rest of the run's config (unknown keys, types and
the entries of data.mixture and data.ul2 are checked there, as typed dataclasses) and calls
check_data_config once; everything in data/ (the stream's StreamSpec, the sources of a mixture,
the UL2 plan) reads these objects, never its own copy of a default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.bart import BartNoise
from data.registry import OBJECTIVES
from data.ul2 import Denoiser


@dataclass
class MixtureEntry:
    """One dataset of data.mixture; empty fields take data.*'s value (filled in by check_data_config)."""
    source: str = ""                # as data.train: a prepared folder, manifest, pattern, pipe:, URL
    weight: float = 1.0
    objective: str = ""             # "" = data.objective
    manifest: str = ""
    name: str = ""                  # "" = its position in the list
    text_field: str = ""            # raw text: "" = data.text_field (and src_field / tgt_field alike)
    src_field: str = ""
    tgt_field: str = ""


@dataclass
class DataConfig:
    train: str = ""                 # shard pattern (dir, brace pattern, pipe:, s3://...) or prepared dir
    valid: str = ""                 # held-out shards; empty = no evaluation
    objective: str = "pairs"        # a name in data/registry.py (pairs, span, ...)
    max_src_len: int = 128          # encoder length (also the packing length for span)
    max_tgt_len: int = 128
    noise_density: float = 0.15     # span corruption: fraction of tokens masked
    mean_span_length: float = 3.0
    num_streams: int = 8            # canonical read streams; the data order depends on this, not on the layout
    shuffle_block: int = 1024       # samples shuffled together inside a stream
    num_workers: int = 1            # loader worker processes per rank
    seed: int = 1234
    max_bad_samples: int = 100      # skipped-and-logged bad samples before the run stops
    train_manifest: str = ""        # manifest for a URL-pattern data.train ("" = manifest.json next to the shards)
    valid_manifest: str = ""
    mixture: list[MixtureEntry] = field(default_factory=list)  # several weighted datasets instead of data.train
    pack: bool = True               # span: concatenate documents to fill max_src_len
    pack_attention: bool = False    # span packing: encoder tokens attend only inside their own document
    bucket_window: int = 8          # pairs: global batches sorted by length together (0 = off)
    tokenizer: str = ""             # tokenizer.json, prepared folder or HF folder; raw text data needs one
    ul2: list[Denoiser] = field(default_factory=list)  # objective ul2: the denoisers (empty = data/ul2.py's default)
    bart: BartNoise = field(default_factory=BartNoise)  # objective bart: mask ratio, span lengths, sentence shuffle
    text_field: str = "text"        # raw text shards: the .json field (or member extension) holding a document
    src_field: str = "src"          # raw text shards, pairs: the source field (or member extension)
    tgt_field: str = "tgt"
    scan_cache: str = ""            # where counts of raw shards are cached ("" = beside them, else RUN_DIR/data-scan)


def check_data_config(d: DataConfig) -> list[tuple[str, str]]:
    """(key, problem) for each bad value; fills in what the config leaves to defaults (mixture
    entries' objective, name and fields; each objective's settings, e.g. the UL2 table), so the saved
    config is complete."""
    bad = []

    def need(ok: bool, key: str, msg: str):
        if not ok:
            bad.append((key, msg))
    need(d.objective in OBJECTIVES, "data.objective", f"must be {', '.join(OBJECTIVES)}, got {d.objective!r}")
    need(0 < d.noise_density < 1, "data.noise_density", f"must be in (0, 1), got {d.noise_density}")
    need(d.mean_span_length >= 1, "data.mean_span_length", f"must be >= 1, got {d.mean_span_length}")
    need(d.num_streams > 0, "data.num_streams", f"must be > 0, got {d.num_streams}")
    need(d.shuffle_block > 0, "data.shuffle_block", f"must be > 0, got {d.shuffle_block}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(d.bucket_window >= 0, "data.bucket_window", f"must be >= 0, got {d.bucket_window}")
    need(d.max_bad_samples >= 0, "data.max_bad_samples", f"must be >= 0, got {d.max_bad_samples}")
    for k in ("text_field", "src_field", "tgt_field"):
        need(bool(getattr(d, k)), f"data.{k}", "must not be empty")
    if d.mixture:
        need(not d.train, "data.mixture", "set either data.train or data.mixture, not both")
        bad += _check_mixture(d)
    if bad:
        return bad
    for name, objective in OBJECTIVES.items():          # each objective's own settings (data.ul2, ...)
        bad += objective.check(d, uses(d, name))
    return bad


def _check_mixture(d: DataConfig) -> list[tuple[str, str]]:
    bad, names = [], set()
    for i, e in enumerate(d.mixture):
        key = f"data.mixture[{i}]"
        if not e.source:
            bad.append((f"{key}.source", "missing"))
        if not (e.weight > 0 and math.isfinite(e.weight)):
            bad.append((f"{key}.weight", f"must be > 0, got {e.weight}"))
        e.objective = e.objective or d.objective
        if e.objective not in OBJECTIVES:
            bad.append((f"{key}.objective", f"must be {', '.join(OBJECTIVES)}, got {e.objective!r}"))
        e.name = e.name or str(i)
        if e.name in names:
            bad.append((f"{key}.name", f"duplicate name {e.name!r}"))
        names.add(e.name)
        for k in ("text_field", "src_field", "tgt_field"):
            setattr(e, k, getattr(e, k) or getattr(d, k))
    return bad


def uses(d: DataConfig, objective: str) -> bool:
    """Whether data.train / data.valid or a mixture entry is trained with this objective."""
    return d.objective == objective or any((e.objective or d.objective) == objective for e in d.mixture)
