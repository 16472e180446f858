"""Reading raw corpora: plain text (one document per line) or JSONL, optionally gzipped.

Bad input raises CorpusError with the file, line and problem in one line.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


class CorpusError(ValueError):
    pass


def _open(path: str):
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file not found: {path}")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str) -> bool:
    p = path[:-3] if path.endswith(".gz") else path
    return p.endswith(".jsonl") or p.endswith(".json")


def read_records(path: str, objective: str, text_field: str = "text", src_field: str = "src",
                 tgt_field: str = "tgt") -> Iterator[tuple]:
    """Yields (text,) for objective 'span' or (src, tgt) for 'pairs'. Blank lines are skipped."""
    jsonl = _is_jsonl(path)
    if objective == "pairs" and not jsonl:
        raise CorpusError(f"{path}: pairs need JSONL with '{src_field}' and '{tgt_field}' fields")
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not jsonl:
                yield (line,)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            fields = (text_field,) if objective == "span" else (src_field, tgt_field)
            out = []
            for k in fields:
                v = rec.get(k) if isinstance(rec, dict) else None
                if not isinstance(v, str):
                    raise CorpusError(f"{path}:{lineno}: missing or non-string field '{k}'")
                out.append(v)
            yield tuple(out)
