"""`encdec generate --input FILE|- [--field F] [--output FILE]`: inputs read lazily, outputs written
as they complete, in input order.

Input: text, one input per line (the line without its newline), or JSONL with --field F (each
line a JSON object; its string field F is the input). A bad line (invalid JSON, not an object,
F missing or not a string) stops the run with `FILE:LINE: ...`.

Output: one line per input: the generation (text input; a newline inside a generation becomes a
space, with one warning), or the input record with a "generated" field added (JSONL input). To a
file: written to FILE.partial, renamed to FILE when every input is done, removed on failure, so
FILE never exists half-written. To stdout: flushed a window at a time.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator

from common.atomic import fsync_dir
from common.errors import UserError

GENERATED = "generated"


def count_lines(path: str) -> int | None:
    """Lines in a regular file (for the ETA), read in blocks; None for stdin or a pipe."""
    if path == "-" or not os.path.isfile(path):
        return None
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def read_inputs(path: str, field: str | None) -> Iterator[tuple[dict | None, str]]:
    """(record or None, text) per input line of `path` ("-" = stdin)."""
    stdin = path == "-"
    f = sys.stdin if stdin else open(path, encoding="utf-8")
    if stdin and hasattr(f, "reconfigure"):
        f.reconfigure(encoding="utf-8")            # whatever the locale says
    name, lineno = "<stdin>" if stdin else path, 0
    try:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if field is None:
                yield None, line
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise UserError(f"{name}:{lineno}: not JSON ({e.msg}); --field {field} reads JSONL") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                got = "no such field" if not isinstance(rec, dict) or field not in rec else \
                    f"a {type(rec[field]).__name__}, not a string"
                raise UserError(f"{name}:{lineno}: field {field!r}: {got}")
            yield rec, rec[field]
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text after line {lineno}") from None
    finally:
        if not stdin:
            f.close()


class Output:
    """Lines to FILE (via FILE.partial, renamed at close) or to stdout; a context manager that
    removes the partial file when the block fails."""

    def __init__(self, path: str | None):
        self.path = path
        self.tmp = f"{path}.partial" if path else None
        self.f = open(self.tmp, "w", encoding="utf-8") if path else sys.stdout
        self.newlines = 0

    def line(self, rec: dict | None, text: str) -> None:
        if rec is not None:
            self.f.write(json.dumps({**rec, GENERATED: text}, ensure_ascii=False) + "\n")
            return
        if "\n" in text or "\r" in text:
            self.newlines += 1
            if self.newlines == 1:
                print("encdec: warning: a generation holds a line break: written as a space (use JSONL input "
                      "with --field for exact text)", file=sys.stderr)
            text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        self.f.write(text + "\n")

    def flush(self) -> None:
        self.f.flush()

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is None:
            self.f.flush()
            return
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
