"""A run's data resolved once, before any process group: each dataset's shards and counts, and the tokenizer.

A source with a manifest (prepared by `encdec prepare`, or a manifest given) is read as it says,
and must have been prepared with the run's tokenizer (the manifests' tokenizer sha256). A source
without one is a webdataset corpus written by another pipeline: its shards are scanned (data/scan.py)
and, when its samples hold text rather than token ids, tokenized on the fly by the loader
workers with data.tokenizer (data/rawtext.py), which it then needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from data.config import DataConfig
from data.mixture import Component
from data.rawtext import RawText
from data.registry import sample_kind
from data.scan import detect_tokens, scan
from data.sources import DataError, exists_all, find_manifest, load_manifest_at, resolve_source, shard_urls
from data.tokenizer import tokenizer_file, tokenizer_hash


@dataclass
class Resolved:
    train: list[Component]
    valid: list[Component] | None     # None: no evaluation data
    tokenizer: str                    # the run's tokenizer.json


@dataclass
class Where:
    """Where scans are cached and who scans first (data/scan.py)."""
    cache_dir: str = ""               # data.scan_cache
    fallback: str = ""                # when the shards' folder cannot be written (the run folder's data-scan/)
    share: tuple = (0, 1)             # (rank, world) of the processes resolving the same data now


def find_tokenizer(d: DataConfig) -> str:
    """data.tokenizer, else tokenizer.json in data.train or in the first local mixture source that has
    one; "" if none."""
    if d.tokenizer:
        return d.tokenizer
    for c in [d.train] + [e.source for e in d.mixture]:
        path = os.path.join(c, "tokenizer.json") if c and os.path.isdir(c) else ""
        if path and os.path.isfile(path):
            return path
    return ""


def fields_of(d, objective: str) -> tuple:
    """The fields a dataset of this objective reads (of DataConfig, or a MixtureEntry)."""
    return (d.text_field,) if sample_kind(objective) == "text" else (d.src_field, d.tgt_field)


def datasets(d: DataConfig, which: str) -> list[tuple]:
    """(name, source, manifest, objective, weight, fields) of data.train / data.mixture ("train") or data.valid."""
    if which == "valid":
        return [("", d.valid, d.valid_manifest, d.objective, 1.0, fields_of(d, d.objective))] if d.valid else []
    if d.train:
        return [("", d.train, d.train_manifest, d.objective, 1.0, fields_of(d, d.objective))]
    if d.mixture:
        return [(e.name, e.source, e.manifest, e.objective, e.weight, fields_of(e, e.objective)) for e in d.mixture]
    raise DataError("config key 'data.train': no training data given (set data.train or data.mixture)")


def component(name: str, source: str, manifest: str, objective: str, weight: float, fields: tuple,
              tokenizer: str, where: Where) -> Component:
    """One dataset: its shards from its manifest, or scanned (raw text is tokenized with `tokenizer`)."""
    man = find_manifest(source, manifest)
    if man:
        shards = resolve_source(source, man)
        _same_tokenizer(man, tokenizer)
        return Component(name, shards, objective, weight)
    urls = shard_urls(source)
    exists_all(urls)
    kind = sample_kind(objective)
    raw = None
    if not detect_tokens(urls, kind):
        if not tokenizer:
            raise DataError(f"config key 'data.tokenizer': {source} holds raw text (webdataset samples without "
                            "token ids) and no tokenizer is given to tokenize it: set data.tokenizer to a "
                            "tokenizer.json, a prepared folder or a Hugging Face model folder")
        raw = RawText(tuple(fields), tokenizer_file(tokenizer))
    shards = scan(urls, kind, raw, where.cache_dir, where.fallback, where.share)
    if sum(s.num_samples for s in shards) == 0:
        raise DataError(f"no samples in {source}")
    return Component(name, shards, objective, weight, raw)


def _same_tokenizer(manifest: str, tokenizer: str) -> None:
    """A prepared source records its tokenizer's sha256: it must be the run's tokenizer's."""
    if not tokenizer:
        return
    tok = tokenizer_file(tokenizer)
    try:
        want = tokenizer_hash(tok)
    except OSError as e:
        raise DataError(f"config key 'data.tokenizer': cannot read {tok} ({e.strerror})") from None
    got = load_manifest_at(manifest).get("tokenizer_sha256")
    if isinstance(got, str) and got and got != want:
        raise DataError(f"{manifest} was prepared with another tokenizer than the run's {tok} "
                        f"(sha256 {got[:12]}... vs {want[:12]}...): prepare it with --tokenizer {tok}")


def check_data(d: DataConfig, where: Where | None = None) -> Resolved:
    """Resolves every configured source (shards exist, manifests readable or shards scanned, each
    prepared source made with the run's tokenizer), before any process group."""
    where = where or Where()
    tok = find_tokenizer(d)
    train = [component(*ds, tok, where) for ds in datasets(d, "train")]
    valid = [component(*ds, tok, where) for ds in datasets(d, "valid")] or None
    if not tok:
        raise DataError(f"config key 'data.tokenizer': no tokenizer.json found in {d.train or 'data.mixture'} "
                        "(give data.tokenizer, or run `encdec prepare` first)")
    return Resolved(train, valid, tokenizer_file(tok))
