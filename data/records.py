"""Decoding tar samples into token arrays, and the bad-sample ledger.

A sample is KEY.json = {"ids": [...]} (span) or {"src": [...], "tgt": [...]} (pairs), as `encdec
prepare` writes it. The exact layout prepare writes is parsed without building Python lists
(several times faster than json.loads); anything else goes through json and full checks.
"""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np

from data.sources import DataError
from data.tar import DUPLICATE
from data.tokenizer import EOS_ID

log = logging.getLogger("encdec.data")


class BadSamples:
    """Counts bad samples once each, logs them with their shard, stops past the limit."""

    def __init__(self, limit: int):
        self.limit, self.seen, self.count = limit, set(), 0

    def add(self, url: str, first: int, n: int, what: str):
        new = [i for i in range(first, first + n) if (url, i) not in self.seen]
        if not new:
            return
        self.seen.update((url, i) for i in new)
        self.count += len(new)
        log.warning("data: skipped %d bad sample(s) in %s: %s [%d so far, limit data.max_bad_samples=%d]",
                    len(new), url, what, self.count, self.limit)
        if self.count > self.limit:
            raise DataError(f"{self.count} bad samples, more than data.max_bad_samples={self.limit} "
                            f"(last: {url}: {what})")


_FAST = {"span": (b'{"ids": [', b"]}", None), "pairs": (b'{"src": [', b"]}", b'], "tgt": [')}


def _int_list(body: bytes):
    """'1, 2, 3' -> int32 array; None unless it is exactly a non-empty list of non-negative integers."""
    if not body or body.translate(None, b"0123456789, ") or not (48 <= body[0] <= 57 and 48 <= body[-1] <= 57):
        return None
    if b" " in body:                                     # exactly ", " between numbers (json.dumps' layout)
        n_sep = body.count(b", ")
        if b" ," in body or body.count(b" ") != n_sep or body.count(b",") != n_sep:
            return None
    elif b",," in body:
        return None
    with warnings.catch_warnings():                      # a malformed list parses short: caught below
        warnings.simplefilter("ignore")
        try:
            a = np.fromstring(body, dtype=np.int64, sep=",")
        except ValueError:
            return None
    if len(a) != body.count(b",") + 1 or a.max() >= 2 ** 31:
        return None
    return a.astype(np.int32)


def _fast_decode(data: bytes, objective: str):
    """The layout `encdec prepare` writes, parsed without building Python lists; None = use json."""
    head, tail, mid = _FAST["pairs" if objective == "pairs" else "span"]
    if not (data.startswith(head) and data.endswith(tail)):
        return None
    body = data[len(head):-len(tail)]
    if mid is None:
        ids = _int_list(body)
        if ids is None:
            return None
        ids = ids[:-1] if ids[-1] == EOS_ID else ids
        return ids if len(ids) else None
    parts = body.split(mid)
    if len(parts) != 2:
        return None
    src, tgt = _int_list(parts[0]), _int_list(parts[1])
    return None if src is None or tgt is None else (src, tgt)


def decode(raw: dict, objective: str, url: str, key: str, vocab: int = 0):
    """Raw tar sample -> token arrays, or a string saying what is wrong with it.

    objective: "pairs" ({"src", "tgt"} -> a tuple of arrays with their </s>), else a document
    ({"ids"} -> an array without its </s>). With vocab > 0, a token id >= vocab (data prepared
    with another tokenizer) makes it bad.
    """
    out = _decode(raw, objective, key)
    if vocab > 0 and not isinstance(out, str):
        top = max(int(a.max()) for a in (out if isinstance(out, tuple) else (out,)))
        if top >= vocab:
            return f"sample {key}: token id {top} >= vocabulary size {vocab} (prepared with another tokenizer?)"
    return out


def _decode(raw: dict, objective: str, key: str):
    data = raw.get("json")
    if data is None:
        return f"sample {key} has no .json member"
    if DUPLICATE in raw:
        return f"sample {key}: member .{raw[DUPLICATE]} appears twice"
    fast = _fast_decode(data, objective)
    if fast is not None:
        return fast
    if not data.strip():
        return f"sample {key}: empty .json member"
    try:
        rec = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return f"sample {key}: .json member is not UTF-8"
    except ValueError as e:
        return f"sample {key}: invalid JSON ({e})"
    fields = ("src", "tgt") if objective == "pairs" else ("ids",)
    out = []
    for f in fields:
        v = rec.get(f) if isinstance(rec, dict) else None
        a = np.asarray(v) if isinstance(v, list) and v else None
        if a is None or a.dtype.kind not in "iu" or a.ndim != 1 or a.min() < 0 or a.max() >= 2 ** 31:
            return f"sample {key}: '{f}' is missing, empty or not a list of token ids"
        out.append(a.astype(np.int32))
    if objective != "pairs":
        ids = out[0][:-1] if out[0][-1] == EOS_ID else out[0]
        return ids if len(ids) else f"sample {key}: empty sample"
    return tuple(out)
