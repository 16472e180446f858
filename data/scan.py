"""Counting a webdataset corpus that has no manifest (shards written by any pipeline), cached.

What the stream needs of each shard is what a manifest holds: its sample count, and for text
(span, ul2) its token count and length index (one uint32 per document: its tokens without </s>,
0 for a bad one), so exact packing works as on prepared data. A scan reads every shard once:
pairs by their tar headers only (payloads are seeked past where the stream allows), text by
tokenizing its documents with the run's tokenizer (batched) exactly as the loader will.

The result of each shard is cached, in order of preference: in data.scan_cache when it is set;
else beside the shard (SHARD_DIR/.encdec-scan/) when that folder can be written; else in the
fallback folder the caller gives (the run folder's data-scan/). An entry is
NAME.<key>.json + NAME.<key>.len, the key a hash of the shard's URL, its identity (size and
mtime of a local file, or of the file a `pipe:` command reads last; size and version of an
fsspec URL), the fields, the sample kind and the tokenizer's sha256: a shard rewritten, another
tokenizer or other fields make a new entry, never a stale one. A shard whose identity cannot be
known (a `pipe:` command over something else) is scanned at every start.

Ranks that start together scan in different orders (rank r starts at shard r x n / world) and
take up each other's entries as they appear, so a shared cache is filled about once.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from common.atomic import atomic_write
from data.packed import INDEX_DTYPE
from data.rawtext import RawText, decode_raw
from data.records import decode
from data.sources import DataError, Shard, _fsspec, _location, is_url
from data.tar import ShardError, count_samples, iter_samples
from data.tokenizer import tokenizer_hash

VERSION = 1
CACHE = ".encdec-scan"
BATCH = 512


def identity(url: str) -> dict | None:
    """What tells a shard's content apart without reading it, or None when nothing does."""
    loc = _location(url)
    if not is_url(loc) or loc.startswith("file://"):
        path = loc[len("file://"):] if loc.startswith("file://") else loc
        if not os.path.isfile(path):
            return None
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        fs, _, [path] = _fsspec().get_fs_token_paths(loc)
        info = fs.info(path)
    except (OSError, ValueError, ImportError, DataError):
        return None
    version = [str(info[k]) for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "md5", "created",
                                      "generation") if info.get(k) is not None]
    return {"url": loc, "size": info.get("size"), "version": version} if version and info.get("size") else None


def detect_tokens(urls: list[str], kind: str) -> bool:
    """Whether a source's first sample holds token ids (the prepared layout) rather than text."""
    for url in urls:
        try:
            for key, raw in iter_samples(url):
                return "json" in raw and not isinstance(decode(raw, kind, url, key), str)
        except ShardError as e:
            raise DataError(f"cannot read shard {url}: {e}") from None
    raise DataError(f"no samples in {urls[0]}{'...' if len(urls) > 1 else ''}")


def scan(urls: list[str], kind: str, raw: RawText | None, cache_dir: str = "", fallback: str = "",
         share: tuple[int, int] = (0, 1)) -> list[Shard]:
    """Shards (counted, with length indexes for text) of a source without a manifest.

    kind: "text" or "pairs" (registry.sample_kind); raw: how text samples are tokenized, None
    for samples of token ids."""
    settings = {"v": VERSION, "kind": kind, "fields": list(raw.fields) if raw else None,
                "tokenizer": tokenizer_hash(raw.tokenizer) if raw and kind == "text" else None}
    n = len(urls)
    rank, world = share
    start = rank * n // max(1, world)
    found: dict[int, Shard] = {}
    t0, scanned, loud = time.perf_counter(), 0, rank == 0
    for j in range(n):
        i = (start + j) % n
        ident = identity(urls[i])
        key = _key(urls[i], ident, settings)
        places = _places(urls[i], ident, cache_dir, fallback)
        shard = next((s for p in places if (s := _read(p, urls[i], key, ident, settings))), None)
        if shard is None:
            if loud and scanned == 0:
                what = "tokenizing its text for the length index" if settings["tokenizer"] else "counting samples"
                print(f"data: scanning the shards of {urls[0]}... ({what}; cached for later starts)",
                      file=sys.stderr, flush=True)
            entry, lengths = _scan_one(urls[i], kind, raw)
            shard = _write(places, urls[i], key, ident, settings, entry, lengths)
            if shard is None and lengths is not None:     # the readers open the index as a file
                raise DataError(f"cannot write the length index of {urls[i]} (tried {', '.join(places) or 'nowhere'}): "
                                "set data.scan_cache to a writable folder")
            shard = shard or Shard(urls[i], entry["num_samples"], entry["num_tokens"])
            scanned += 1
        found[i] = shard
    if loud and scanned:
        print(f"data: scanned {scanned} of {n} shard(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    return [found[i] for i in range(n)]


def _key(url: str, ident, settings: dict) -> str:
    text = json.dumps({"url": url, "id": ident, **settings}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _places(url: str, ident, cache_dir: str, fallback: str) -> list[str]:
    if cache_dir:
        return [cache_dir]
    out = [os.path.join(os.path.dirname(ident["path"]), CACHE)] if ident and "path" in ident else []
    return out + ([fallback] if fallback else [])


def _name(url: str, key: str) -> str:
    base = _location(url).rstrip("/").rsplit("/", 1)[-1] or "shard"
    return f"{base[:-4] if base.endswith('.tar') else base}.{key}"


def _read(folder: str, url: str, key: str, ident, settings: dict) -> Shard | None:
    """A cache entry that matches the shard and the settings, or None (missing, stale or damaged;
    and always for a shard of unknown identity, whose entry only holds its index for this start)."""
    if ident is None:
        return None
    path = os.path.join(folder, _name(url, key))
    try:
        with open(path + ".json", encoding="utf-8") as f:
            e = json.load(f)
        if e.get("url") != url or e.get("id") != ident or e.get("settings") != settings:
            return None
        n, tokens = int(e["num_samples"]), int(e["num_tokens"])
        if settings["kind"] != "text":
            return Shard(url, n, tokens)
        if os.path.getsize(path + ".len") != 4 * n:
            return None
        return Shard(url, n, tokens, path + ".len", int(e["doc_tokens"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _scan_one(url: str, kind: str, raw: RawText | None):
    """-> (entry: counts, the length index or None)."""
    try:
        if kind != "text":
            return {"num_samples": count_samples(url), "num_tokens": 0}, None
        lengths, tokens, batch = [], 0, []

        def flush():
            nonlocal tokens
            docs = decode_raw(batch, raw) if raw else [decode(r, kind, url, k) for k, r in batch]
            for d in docs:
                lengths.append(0 if isinstance(d, str) else len(d))
                tokens += 0 if isinstance(d, str) else len(d) + 1          # with its </s>, as a manifest counts
            batch.clear()
        for item in iter_samples(url):
            batch.append(item)
            if len(batch) == BATCH:
                flush()
        flush()
    except ShardError as e:
        raise DataError(f"cannot scan shard {url}: {e} (every shard of a source without a manifest is read "
                        "once at start to count it)") from None
    return {"num_samples": len(lengths), "num_tokens": tokens, "doc_tokens": int(sum(lengths))}, lengths


def _write(places: list[str], url, key, ident, settings, entry: dict, lengths) -> Shard | None:
    """The entry written to the first place that takes it (the index before the entry: an entry is complete)."""
    for folder in places:
        path = os.path.join(folder, _name(url, key))
        try:
            os.makedirs(folder, exist_ok=True)
            if lengths is not None:
                atomic_write(path + ".len", np.asarray(lengths, dtype=INDEX_DTYPE).tobytes())
            atomic_write(path + ".json", json.dumps({"url": url, "id": ident, "settings": settings, **entry}))
        except OSError:
            continue
        return Shard(url, entry["num_samples"], entry["num_tokens"], path + ".len" if lengths is not None else "",
                     entry.get("doc_tokens", -1) if lengths is not None else -1)
    return None
