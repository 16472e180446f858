"""Reading raw corpora: plain text (one document per line) or JSONL, optionally gzipped.

Bad input raises CorpusError with the file, line and problem in one line.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Iterator

from common.errors import UserError


class CorpusError(UserError):
    pass


def _open(path: str):
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file not found: {path}")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str) -> bool:
    p = path[:-3] if path.endswith(".gz") else path
    return p.endswith(".jsonl") or p.endswith(".json")


def read_records(path: str, objective: str, text_field: str = "text", src_field: str = "src",
                 tgt_field: str = "tgt", on_bad=None, start: int = 0, end: int = -1) -> Iterator[tuple]:
    """Yields (text,) for objective 'span' or (src, tgt) for 'pairs'. Blank lines are skipped.

    A bad line (not UTF-8, invalid JSON, a missing, non-string or empty field) raises CorpusError
    naming file:line, or with on_bad is passed to on_bad(path, lineno, reason) and skipped.
    start/end (plain files): only the lines that start at a byte in [start, end) (end -1: to the end).
    """
    jsonl = _is_jsonl(path)
    if objective == "pairs" and not jsonl:
        raise CorpusError(f"{path}: pairs need JSONL with '{src_field}' and '{tgt_field}' fields")
    fields = (text_field,) if objective == "span" else (src_field, tgt_field)
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
