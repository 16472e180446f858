"""Reading raw corpora: plain text (one document per line), JSONL, or webdataset tars (a document
per sample, data/rawtext.py), each gzipped, bzip2- or xz-compressed or not.

What a file is comes from its content, not its name: a tar or a compressed file is read as
one whatever it is called, and anything else holding NUL bytes (binary data) is refused, never
tokenized as text. Bad input raises CorpusError with the file, line (or sample) and problem in one line.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterator

from common.errors import UserError
from data.rawtext import texts_of
from data.tar import OPEN, ShardError, compression, is_tar, iter_samples

SNIFF = 1 << 16                 # bytes looked at to tell what a file is


class CorpusError(UserError):
    pass


@functools.lru_cache(maxsize=4096)
def input_kind(path: str, size: int = -1, mtime: int = -1) -> tuple[str, str]:
    """(what the file holds: "text" or "tar", its compression: gzip, bzip2, xz or ""); binary data ->
    CorpusError. (size and mtime only key the cache.)"""
    with open(path, "rb") as f:
        head = f.read(SNIFF)
    how = compression(head)
    if how:
        try:
            with OPEN[how](path, "rb") as f:
                head = f.read(SNIFF)
        except (OSError, EOFError, ValueError) as e:
            raise CorpusError(f"{path}: {how}-compressed, but cannot be decompressed ({e})") from None
    if is_tar(head):
        return "tar", how
    if b"\0" in head:
        at, after = head.index(b"\0"), f" after {how} decompression" if how else ""
        raise CorpusError(f"{path}: binary data (a NUL byte at offset {at}{after}), not text, JSONL or a tar: refused")
    return "text", how


def kind_of(path: str) -> tuple[str, str]:
    try:
        st = os.stat(path)
    except OSError:
        raise CorpusError(f"corpus file not found: {path}") from None
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file not found: {path}")
    return input_kind(path, st.st_size, st.st_mtime_ns)


def _open(path: str):
    how = kind_of(path)[1]
    return OPEN[how](path, "rb") if how else open(path, "rb")


def _is_jsonl(path: str) -> bool:
    p = path[:-3] if path.endswith(".gz") else path
    return p.endswith(".jsonl") or p.endswith(".json")


def cuttable(path: str) -> bool:
    """Whether a file can be cut at line starts (plain, uncompressed text)."""
    return kind_of(path) == ("text", "")


def read_records(path: str, objective: str, text_field: str = "text", src_field: str = "src",
                 tgt_field: str = "tgt", on_bad=None, start: int = 0, end: int = -1) -> Iterator[tuple]:
    """Yields (text,) for objective 'span' or (src, tgt) for 'pairs'. Blank lines are skipped.

    A bad line (not UTF-8, invalid JSON, a missing, non-string or empty field, NUL bytes) raises
    CorpusError naming file:line, or with on_bad is passed to on_bad(path, lineno, reason) and
    skipped. A tar's samples are read as raw text samples (data/rawtext.py; bad ones by key).
    start/end (plain files): only the lines that start at a byte in [start, end) (end -1: to the end).
    """
    fields = (text_field,) if objective == "span" else (src_field, tgt_field)
    if kind_of(path)[0] == "tar":
        yield from _tar_records(path, fields, on_bad)
        return
    jsonl = _is_jsonl(path)
    if objective == "pairs" and not jsonl:
        raise CorpusError(f"{path}: pairs need JSONL with '{src_field}' and '{tgt_field}' fields (or a tar)")
    with _open(path) as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())        # the line running into `start` belongs to the piece before
        first, base = pos, None
        for i, raw in enumerate(f, 1):
            if 0 <= end <= pos:
                return
            pos += len(raw)
            rec = _parse(raw, jsonl, fields)
            if isinstance(rec, tuple):
                yield rec
            elif rec:
                if base is None:
                    base = _lines_before(path, first)
                if on_bad is None:
                    raise CorpusError(f"{path}:{base + i}: {rec}")
                on_bad(path, base + i, rec)


def _tar_records(path: str, fields: tuple, on_bad) -> Iterator[tuple]:
    """The samples of a webdataset tar as records: members by extension (.txt, .json and its fields)."""
    try:
        for key, raw in iter_samples(path):
            rec = texts_of(raw, fields)
            if isinstance(rec, tuple):
                yield rec
            elif on_bad is None:
                raise CorpusError(f"{path}: sample {key}: {rec}")
            else:
                on_bad(path, f"sample {key}", rec)
    except ShardError as e:
        raise CorpusError(f"{path}: unreadable tar ({e})") from None


def _lines_before(path: str, pos: int) -> int:
    """Line count of the first `pos` bytes (file:line numbers of a piece that starts mid-file)."""
    n = 0
    with _open(path) as f:
        while pos > 0:
            chunk = f.read(min(pos, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            pos -= len(chunk)
    return n


def _parse(raw: bytes, jsonl: bool, fields):
    """A line -> a record tuple, "" (blank: skipped) or the reason it is bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason} at byte {e.start})"
    line = line.rstrip("\r\n")
    if "\0" in line:
        return "NUL bytes (binary data, not text)"
    if not line.strip():
        return ""
    if not jsonl:
        return (line,)
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg})"
    out = []
    for k in fields:
        v = rec.get(k) if isinstance(rec, dict) else None
        if not isinstance(v, str):
            return f"missing or non-string field '{k}'"
        if not v.strip():
            return f"empty field '{k}'"
        out.append(v)
    return tuple(out)
