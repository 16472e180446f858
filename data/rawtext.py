"""Raw text samples (webdataset shards written by any pipeline): where a sample's text is, and its tokens.

A document (objectives span, ul2) is, in this order:
    KEY.<text_field>              a member named by the field (e.g. KEY.text)
    KEY.json {"<text_field>": ...} the field of the sample's JSON member (data.text_field, default "text")
    KEY.txt                       the sample's text member (or KEY.text)
A pair (objective pairs) is src_field and tgt_field, each a member named by the field (KEY.en.txt
with data.src_field=en.txt) or a field of the JSON member (default "src" and "tgt").
Members are UTF-8 text without NUL bytes, their trailing line break dropped; JSON fields are taken
as they are; a document that is empty or only whitespace is bad (as a blank line is to `encdec
prepare`).

The same functions give `encdec prepare` its records when it reads a tar, and the loader its
examples when raw shards are trained on directly: the tokenizer (with </s> appended, as prepare
makes it) encodes the same strings with the same batched call, so a corpus trained raw and the
same corpus prepared give the same token ids.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from data.tar import DUPLICATE
from data.tokenizer import EOS_ID, text_tokenizer

TEXT_MEMBERS = ("txt", "text")
JSON_MEMBERS = ("json", "jsn")


@dataclass(frozen=True)
class RawText:
    """How a raw dataset's samples become token ids: its fields, and the tokenizer.json to encode them."""
    fields: tuple                   # (text_field,) for text objectives, (src_field, tgt_field) for pairs
    tokenizer: str


class _Bad(Exception):
    pass


def _member_text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if "\0" in text:
        raise _Bad(f"{what} holds NUL bytes (binary data, not text)")
    return text.rstrip("\r\n")


def texts_of(raw: dict, fields: tuple):
    """A raw sample ({extension: bytes}) -> its texts (one per field), or a string saying why it is bad."""
    try:
        if DUPLICATE in raw:
            raise _Bad(f"member .{raw[DUPLICATE]} appears twice")
        out, rec = [], None
        for f in fields:
            ext = f.lower()
            if ext in raw:
                text = _member_text(raw[ext], f".{ext} member")
            else:
                if rec is None:
                    rec = _json(raw)
                if isinstance(rec, dict) and f in rec:
                    text = rec[f]
                    if not isinstance(text, str):
                        raise _Bad(f"field '{f}' of the .json member is not a string")
                elif len(fields) == 1 and (m := next((e for e in TEXT_MEMBERS if e in raw), None)):
                    text = _member_text(raw[m], f".{m} member")
                else:
                    where = "no .json member" if rec is False else f"no '{f}' field in its .json member"
                    raise _Bad(f"no .{ext} member, {where}" + (", no .txt member" if len(fields) == 1 else "")
                               + f" (members: {', '.join(sorted(raw)) or 'none'})")
            if not text.strip():
                raise _Bad(f"empty '{f}'")
            out.append(text)
        return tuple(out)
    except _Bad as e:
        return str(e)


def _json(raw: dict):
    """The sample's JSON member parsed, or False when it has none."""
    ext = next((e for e in JSON_MEMBERS if e in raw), None)
    if ext is None:
        return False
    try:
        return json.loads(raw[ext].decode("utf-8"))
    except UnicodeDecodeError:
        raise _Bad(f".{ext} member is not UTF-8") from None
    except ValueError as e:
        raise _Bad(f"invalid JSON in .{ext} ({e})") from None


def encode(tok, records: list[tuple]) -> list[list[list[int]]]:
    """Records (tuples of texts) -> per record, the ids of each text (ending in </s>); one batched call per field."""
    cols = [[e.ids for e in tok.encode_batch(list(col))] for col in zip(*records)]
    return [list(row) for row in zip(*cols)]


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return text_tokenizer(path)


def decode_raw(items: list[tuple], raw_text: RawText) -> list:
    """(key, raw sample) pairs -> per sample: a document's ids without </s> (one field), a (src, tgt)
    pair of ids ending in </s> (two fields), both int32, or a string saying why it is bad."""
    texts = [texts_of(raw, raw_text.fields) for _, raw in items]
    good = [t for t in texts if not isinstance(t, str)]
    ids = iter(encode(_tokenizer(raw_text.tokenizer), good) if good else [])
    out = []
    for (key, _), t in zip(items, texts):
        if isinstance(t, str):
            out.append(f"sample {key}: {t}")
            continue
        row = next(ids)
        if len(row) == 1:
            doc = row[0][:-1] if row[0][-1:] == [EOS_ID] else row[0]
            out.append(np.asarray(doc, dtype=np.int32) if doc else f"sample {key}: empty sample")
        else:
            out.append(tuple(np.asarray(r, dtype=np.int32) for r in row))
    return out
