"""Where shards come from (data/tar.py reads them).

A source is one of
    /data/prepared                     a prepared folder (its manifest.json lists the shards)
    /data/prepared/manifest.json       a manifest (local or any URL): shards sit next to it
    /data/shard-{000000..000099}.tar   a brace pattern (several patterns joined by '::'); local globs too
    pipe:curl -s https://host/shard-{000..099}.tar    a shell command per shard that writes the tar
    s3://bucket/shard-{000..099}.tar   any fsspec URL (s3://, gs://, https://, file://, memory://)
    /data/shards                       a folder of webdataset shards without a manifest (its *.tar, *.tar.gz)
For a pattern the per-shard sample counts come from a manifest: given explicitly, or the
manifest.json next to the shards (for `pipe:` the last argument of the command is the shard's
location); a source with no manifest at all is counted by a scan (data/scan.py, data/resolve.py).
Everything here fails at start with one line naming the source: a pattern that matches nothing,
a shard missing from the manifest, a local or fsspec shard that does not exist.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from dataclasses import dataclass

import braceexpand

from common.errors import UserError

MANIFEST = "manifest.json"
TAR_FILES = ("*.tar", "*.tar.gz", "*.tgz")     # the shards of a folder without a manifest


class DataError(UserError):
    """Bad or missing data; the message names the file, shard or key."""


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    num_tokens: int = 0             # 0 = not known (packing needs it)
    index: str = ""                 # URL of its length index (uint32 tokens per document), "" = none
    doc_tokens: int = -1            # sum of the index (tokens without </s>), -1 = no index


def is_url(s: str) -> bool:
    return s.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s) is not None


def _location(url: str) -> str:
    """Where a shard lives: the URL itself, or for `pipe:` the last argument of the command."""
    if not url.startswith("pipe:"):
        return url[len("file://"):] if url.startswith("file://") else url
    args = url[5:].split()
    return args[-1] if args else url


def _dirname(loc: str) -> str:
    return loc.rsplit("/", 1)[0] if "/" in loc else "."


def _join(base: str, name: str) -> str:
    return name if is_url(name) or os.path.isabs(name) else f"{base.rstrip('/')}/{name}"


def expand(pattern: str) -> list[str]:
    """'::'-separated brace patterns -> URLs; a local pattern with * ? [ is globbed (sorted)."""
    out = []
    for part in pattern.split("::"):
        for url in braceexpand.braceexpand(part.strip()):
            if not is_url(url) and any(c in url for c in "*?["):
                out.extend(sorted(glob.glob(url)))
            else:
                out.append(url)
    return out


def _fsspec():
    try:
        import fsspec
    except ImportError:                                     # pragma: no cover - fsspec is a dependency
        raise DataError("reading URLs needs fsspec (pip install fsspec)") from None
    return fsspec


def read_bytes(url: str) -> bytes:
    """The whole content of a small file (a manifest) at a local path, fsspec URL or `pipe:`."""
    try:
        if url.startswith("pipe:"):
            return subprocess.run(url[5:], shell=True, check=True, capture_output=True).stdout
        if not is_url(url) or url.startswith("file://"):
            with open(_location(url), "rb") as f:
                return f.read()
        with _fsspec().open(url, "rb") as f:
            return f.read()
    except (OSError, subprocess.CalledProcessError, ImportError) as e:
        raise DataError(f"cannot read {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_manifest_at(url: str) -> dict:
    raw = read_bytes(url)
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{url}: invalid manifest JSON ({e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        raise DataError(f"{url}: manifest has no 'shards' list")
    for i, s in enumerate(man["shards"]):
        if not isinstance(s, dict) or "name" not in s or not isinstance(s.get("num_samples"), int):
            raise DataError(f"{url}: manifest shard {i} needs 'name' and an integer 'num_samples'")
        why = unsafe_name(s["name"])
        if why:
            raise DataError(f"{url}: manifest shard {i} name {str(s['name'])[:200]!r} refused: {why} (a manifest "
                            "names its shards by plain relative file names; pipe: and URLs only from your config)")
    return man


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def unsafe_name(name) -> str:
    """Why a shard name read from a manifest is not a plain relative file name ("" when it is).

    A manifest is data (it may come from a download or a URL): its names are joined to the
    manifest's own folder, never run (`pipe:`), fetched elsewhere (a scheme) or allowed out of
    that folder (absolute paths, `..`, `~`)."""
    if not isinstance(name, str) or not name.strip():
        return "not a non-empty string"
    if any(c in name for c in "\0\n\r\\") or not name.isprintable():
        return "control characters or backslashes"
    if _SCHEME.match(name):
        return "a command or URL scheme"
    if name.startswith(("/", "~")):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' component"
    if any(c in name for c in "{}*?[") or "::" in name:
        return "pattern characters"
    return ""


def exists_all(urls: list[str]) -> None:
    """Shards must exist: local ones each, fsspec ones by one listing per folder (http(s), which
    cannot be listed, by the first shard). `pipe:` commands, and the rest, are checked when read."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        if u.startswith("pipe:"):
            continue
        if not is_url(u) or u.startswith("file://"):
            if not os.path.isfile(_location(u)):
                raise DataError(f"shard not found: {u}")
            continue
        by_dir.setdefault(_dirname(u), []).append(u)
    for d, us in by_dir.items():
        try:
            fs, _, [path] = _fsspec().get_fs_token_paths(d)
        except (ImportError, ValueError) as e:
            raise DataError(f"cannot read {us[0]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        try:
            if d.startswith(("http://", "https://")):
                raise OSError("not listable")
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            missing = [u for u in us if u.rsplit("/", 1)[-1] not in names]
        except OSError:
            missing = [] if fs.exists(us[0]) else us[:1]
        if missing:
            raise DataError(f"shard not found: {missing[0]}")


def shard_urls(spec: str) -> list[str]:
    """The shard URLs of a pattern, or of a local folder without a manifest (its *.tar, *.tar.gz, *.tgz)."""
    if not is_url(spec) and os.path.isdir(spec):
        urls = sorted({p for pat in TAR_FILES for p in glob.glob(os.path.join(glob.escape(spec), pat))})
        if not urls:
            raise DataError(f"no {MANIFEST} and no .tar shards in {spec} (give webdataset shards, or run "
                            "`encdec prepare` first)")
        return urls
    urls = expand(spec)
    local = [u for u in urls if not is_url(u)]
    if not urls or (local and not any(os.path.isfile(u) for u in local)):
        raise DataError(f"shard pattern matches nothing: {spec}")
    return urls


def find_manifest(spec: str, manifest: str = "") -> str:
    """The manifest of a source: the one given, the source itself (a .json), the folder's, or the one
    next to its shards; "" when there is none (shards written by another pipeline: data/scan.py)."""
    if not spec:
        raise DataError("no data source given")
    if manifest or spec.endswith(".json"):
        return manifest or spec
    if not is_url(spec) and os.path.isdir(spec):
        path = os.path.join(spec, MANIFEST)
        return path if os.path.isfile(path) else ""
    near = _join(_dirname(_location(shard_urls(spec)[0])), MANIFEST)
    if not is_url(near):
        return near if os.path.isfile(near) else ""
    try:
        read_bytes(near)
    except DataError:
        return ""
    return near


def source_manifest(spec: str, manifest: str = "") -> tuple[str, dict, list[str]]:
    """Source spec -> (manifest URL, manifest, shard URLs)."""
    if not spec:
        raise DataError("no data source given")
    local_dir = not is_url(spec) and os.path.isdir(spec)
    if local_dir or spec.endswith(".json"):               # a prepared folder or a manifest: all its shards
        manifest = manifest or (spec if spec.endswith(".json") else os.path.join(spec, MANIFEST))
        if not is_url(manifest) and not os.path.isfile(manifest):
            raise DataError(f"no {MANIFEST} for the data at {spec} (run `encdec prepare` first)")
        man = load_manifest_at(manifest)
        base = spec if local_dir else _dirname(_location(manifest))
        urls = [_join(base, s["name"]) for s in man["shards"]]
    else:                                                  # a pattern
        urls = shard_urls(spec)
        manifest = manifest or _join(_dirname(_location(urls[0])), MANIFEST)
        man = load_manifest_at(manifest)
    return manifest, man, urls


def resolve_source(spec: str, manifest: str = "") -> list[Shard]:
    """Source spec (see the module doc) -> its shards with their sample counts."""
    manifest, man, urls = source_manifest(spec, manifest)
    entries = {os.path.basename(s["name"]): s for s in man["shards"]}
    shards = []
    for u in urls:
        e = entries.get(os.path.basename(_location(u)))
        if e is None:
            raise DataError(f"shard {u} is not listed in the manifest {manifest}")
        index = e.get("index")
        ok = isinstance(index, str) and index and "/" not in index and "\\" not in index and not is_url(index)
        index = _join(_dirname(u), index) if ok else ""          # a plain file name next to the shard, never a command
        doc_tokens = e.get("doc_tokens")
        shards.append(Shard(u, int(e["num_samples"]), int(e.get("num_tokens", 0) or 0), index,
                            int(doc_tokens) if index and isinstance(doc_tokens, int) else -1))
    exists_all([s.url for s in shards])
    if sum(s.num_samples for s in shards) == 0:
        raise DataError(f"no samples in {spec}")
    return shards
