"""The plan step of `encdec prepare` (see prepare.py): inputs checked, units cut, tokenizer ready.

OUT.parts/plan.json holds everything a slice needs, so a slice started anywhere (another process,
a Slurm array task) does the same work as one process would.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np

from common.atomic import atomic_write
from data.corpus import CorpusError, _is_jsonl, _open, _parse, cuttable, kind_of, read_records
from data.tokenizer import ensure_eos, load_tokenizer, sentinel_ids, tokenizer_hash, train_tokenizer

PLAN = "plan.json"
WINDOW = 1 << 20                       # bytes read at each random offset of the tokenizer sample
log = logging.getLogger("encdec.prepare")


def work_dir(out: str) -> str:
    return out.rstrip("/") + ".parts"


def parse_limit(text) -> tuple[int | None, float]:
    """'100' -> (100, 0); '0.5%' -> (None, 0.005)."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        return None, float(m.group(1)) / 100
    if re.fullmatch(r"\d+", s):
        return int(s), 0.0
    raise CorpusError(f"--max-bad-lines: expected a count (100) or a percentage of lines (0.5%), got {text!r}")


def limit_text(count, frac) -> str:
    return str(count) if count is not None else f"{frac * 100:g}%"


class BadLines:
    """Bad input lines of one unit: counted per file, logged as file:line (the first 20 of each file)."""

    def __init__(self, limit):
        self.count_limit = limit[0]
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.first = ""
        self.total = 0

    def add(self, path: str, lineno: int, reason: str) -> None:
        self.counts[path] = self.counts.get(path, 0) + 1
        self.total += 1
        self.first = self.first or f"{path}:{lineno}: {reason}"
        if self.counts[path] <= 20:
            print(f"prepare: skipped bad line {path}:{lineno}: {reason}", flush=True)   # stdout: errors alone on stderr
        if self.count_limit is not None and self.total > self.count_limit:
            raise CorpusError(f"more than --max-bad-lines={self.count_limit} bad lines (first: {self.first})")


def cut_units(inputs: list[str], unit_bytes: int) -> list[list[list[int]]]:
    """Units of work: lists of pieces [file index, first byte, end byte (-1: to the end)].

    Consecutive small files are grouped until a unit holds at least unit_bytes; a plain (not
    compressed, not a tar) file larger than unit_bytes is cut into pieces of unit_bytes, one unit each (a piece
    holds the lines that start inside it). The cut depends on the inputs only.
    """
    units, cur, size = [], [], 0
    for k, p in enumerate(inputs):
        n = os.path.getsize(p)
        if n > unit_bytes and cuttable(p):
            if cur:
                units.append(cur)
                cur, size = [], 0
            units += [[[k, a, min(n, a + unit_bytes)]] for a in range(0, n, unit_bytes)]
            continue
        cur.append([k, 0, -1])
        size += n
        if size >= unit_bytes:
            units.append(cur)
            cur, size = [], 0
    return units + ([cur] if cur else [])


def make_plan(inputs, out, objective, tokenizer, vocab_size, shard_size, fields, overwrite, max_bad_lines,
              tokenizer_sample, unit_bytes, seed, add_tokens=()) -> str:
    """add_tokens: special tokens appended to the vocabulary (e.g. UL2's mode tokens [NLU] [NLG] [S2S])."""
    if objective not in ("span", "pairs"):
        raise CorpusError(f"objective must be 'span' or 'pairs', got {objective!r}")
    if not inputs:
        raise CorpusError("no input files given")
    for p in inputs:
        kind = kind_of(p)[0]                           # a missing or binary file is refused here
        if objective == "pairs" and kind != "tar" and not _is_jsonl(p):
            raise CorpusError(f"{p}: pairs need JSONL with '{fields[1]}' and '{fields[2]}' fields (or a tar)")
    if os.path.exists(out) and not overwrite:
        raise CorpusError(f"output folder exists: {out} (pass --overwrite to replace it)")
    if shard_size < 1:
        raise CorpusError(f"--shard-size must be >= 1, got {shard_size}")
    if unit_bytes < 1024:
        raise CorpusError(f"--unit-size must be >= 1024 bytes, got {unit_bytes}")
    limit = parse_limit(max_bad_lines)
    work = work_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        tok_path = os.path.join(work, "tokenizer.json")
        if tokenizer:
            src = tokenizer if tokenizer.endswith(".json") else os.path.join(tokenizer, "tokenizer.json")
            tok = load_tokenizer(src)              # ours, or a Hugging Face folder's (e.g. T5's)
            if objective == "span" and not sentinel_ids(tok):
                raise CorpusError(f"tokenizer {src} has no sentinel tokens (<extra_id_0>, ...): span "
                                  "corruption needs them; use --objective pairs or a tokenizer that has them")
            changed = ensure_eos(tok)              # every prepared sequence must end with </s>
            if _add_tokens(tok, add_tokens) or changed:
                tok.save(tok_path)
            else:
                shutil.copyfile(src, tok_path)
        else:
            texts = sample_texts(inputs, objective, fields, tokenizer_sample, seed)
            if not texts:
                raise CorpusError(f"empty corpus: no records in {', '.join(inputs)}")
            tok = train_tokenizer(texts, vocab_size)
            _add_tokens(tok, add_tokens)
            tok.save(tok_path)
        inputs = [os.path.abspath(p) for p in inputs]
        plan = {"inputs": inputs, "objective": objective, "fields": list(fields), "shard_size": shard_size,
                "units": cut_units(inputs, unit_bytes), "max_bad_lines": list(limit), "overwrite": overwrite,
                "tokenizer_sha256": tokenizer_hash(tok_path), "vocab_size": load_tokenizer(tok_path).get_vocab_size()}
        atomic_write(os.path.join(work, PLAN), json.dumps(plan, indent=1))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


def read_plan(work: str) -> dict:
    path = os.path.join(work, PLAN)
    if not os.path.isfile(path):
        raise CorpusError(f"no {PLAN} in {work}: run `encdec prepare INPUTS --out OUT --plan-only` first")
    with open(path, encoding="utf-8") as f:
        plan = json.load(f)
    plan["max_bad_lines"] = tuple(plan["max_bad_lines"])
    return plan


def sample_texts(inputs, objective, fields, budget: int, seed: int) -> list[str]:
    """At most ~budget bytes of text for tokenizer training: all of a corpus that fits, else windows
    at seeded random offsets of each file (its share by size); compressed files and tars from their start."""
    sizes = [os.path.getsize(p) for p in inputs]
    if sum(sizes) <= budget:
        recs = (r for p in inputs for r in read_records(p, objective, *fields, on_bad=lambda *a: None))
        return [t for r in recs for t in r]
    out = []
    for k, (p, size) in enumerate(zip(inputs, sizes)):
        share = int(budget * size / sum(sizes))
        if share <= 0:
            continue
        fl = (fields[0],) if objective == "span" else tuple(fields[1:])
        if kind_of(p)[0] == "tar":
            out.extend(_tar_texts(p, objective, fields, share))
            continue
        lines = _window_lines(p, size, share, seed, k) if cuttable(p) else _head_lines(p, share)
        for raw in lines:
            rec = _parse(raw, _is_jsonl(p), fl)
            if isinstance(rec, tuple):
                out.extend(rec)
    return out


def _window_lines(path, size, share, seed, k):
    n = max(1, share // WINDOW)
    width = min(WINDOW, share)
    starts = np.sort(np.random.default_rng([seed, k]).choice(max(1, size - width), n, replace=n > size - width))
    with open(path, "rb") as f:
        end = 0
        for a in starts:
            a = max(int(a), end)
            f.seek(a)
            if a:
                f.readline()                       # from the next whole line
            while f.tell() < a + width and (raw := f.readline()):
                yield raw
            end = f.tell()


def _tar_texts(path, objective, fields, share):
    got = 0
    for rec in read_records(path, objective, *fields, on_bad=lambda *a: None):
        yield from rec
        got += sum(len(t) for t in rec)
        if got >= share:
            return


def _head_lines(path, share):
    got = 0
    with _open(path) as f:
        for raw in f:
            yield raw
            got += len(raw)
            if got >= share:
                return


def _add_tokens(tok, tokens) -> bool:
    """Appends the special tokens the tokenizer lacks; True when it changed."""
    new = [t for t in tokens if tok.token_to_id(t) is None]
    if new:
        tok.add_special_tokens(new)
    return bool(new)
