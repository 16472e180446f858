"""`encdec prepare`: raw text -> tokenizer -> tokenized webdataset tar shards + manifest.json.

Output folder (written under a temporary name, renamed when complete):
    tokenizer.json           the tokenizer (trained here, or a copy of the one given)
    shard-000000.tar ...     webdataset shards; each sample is KEY.json = {"src": [ids], "tgt": [ids]}
                             for pairs or {"ids": [ids]} for monolingual text (every list ends with </s>)
    manifest.json            objective, sample and token counts per shard, tokenizer sha256
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import webdataset as wds
from tqdm import tqdm

from data.corpus import CorpusError, read_records
from data.tokenizer import ensure_eos, load_tokenizer, sentinel_ids, tokenizer_hash, train_tokenizer
from common.atomic import atomic_dir

MANIFEST = "manifest.json"


def _records(inputs, objective, fields):
    return itertools.chain.from_iterable(read_records(p, objective, *fields) for p in inputs)


def prepare(inputs: list[str], out_dir: str, objective: str = "span", tokenizer: str | None = None,
            vocab_size: int = 8000, shard_size: int = 10000, text_field: str = "text", src_field: str = "src",
            tgt_field: str = "tgt", overwrite: bool = False, progress: bool = True, add_tokens=()) -> dict:
    """add_tokens: special tokens appended to the vocabulary (e.g. UL2's mode tokens [NLU] [NLG] [S2S])."""
    if objective not in ("span", "pairs"):
        raise CorpusError(f"objective must be 'span' or 'pairs', got {objective!r}")
    if not inputs:
        raise CorpusError("no input files given")
    for p in inputs:
        if not os.path.isfile(p):
            raise CorpusError(f"corpus file not found: {p}")
    if os.path.exists(out_dir) and not overwrite:
        raise CorpusError(f"output folder exists: {out_dir} (pass --overwrite to replace it)")
    fields = (text_field, src_field, tgt_field)
    # One pass to validate everything (UTF-8, JSON, fields) before any output is written.
    n_records = sum(1 for _ in _records(inputs, objective, fields))
    if n_records == 0:
        raise CorpusError(f"empty corpus: no records in {', '.join(inputs)}")

    with atomic_dir(out_dir) as tmp:
        tok_path = os.path.join(tmp, "tokenizer.json")
        if tokenizer:
            src_tok = tokenizer if tokenizer.endswith(".json") else os.path.join(tokenizer, "tokenizer.json")
            tok = load_tokenizer(src_tok)          # ours, or a Hugging Face folder's (e.g. T5's)
            if objective == "span" and not sentinel_ids(tok):
                raise CorpusError(f"tokenizer {src_tok} has no sentinel tokens (<extra_id_0>, ...): span "
                                  "corruption needs them; use --objective pairs or a tokenizer that has them")
            changed = ensure_eos(tok)              # every prepared sequence must end with </s>
            if _add_tokens(tok, add_tokens) or changed:
                tok.save(tok_path)
            else:
                shutil.copyfile(src_tok, tok_path)
        else:
            texts = (t for rec in _records(inputs, objective, fields) for t in rec)
            tok = train_tokenizer(texts, vocab_size)
            _add_tokens(tok, add_tokens)
            tok.save(tok_path)
        manifest = _write_shards(tok, _records(inputs, objective, fields), n_records, tmp, objective,
                                 shard_size, progress)
        manifest.update(tokenizer_sha256=tokenizer_hash(tok_path), vocab_size=tok.get_vocab_size(),
                        inputs=[os.path.abspath(p) for p in inputs], created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _add_tokens(tok, tokens) -> bool:
    """Appends the special tokens the tokenizer lacks; True when it changed."""
    new = [t for t in tokens if tok.token_to_id(t) is None]
    if new:
        tok.add_special_tokens(new)
    return bool(new)


def _write_shards(tok, records, n_records, out, objective, shard_size, progress) -> dict:
    shards, batch = [], []
    bar = tqdm(total=n_records, unit="rec", desc="prepare", disable=not progress, mininterval=1.0)
    writer = wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=shard_size, verbose=0)
    index = 0
    try:
        for batch in _batched(records, 1000):
            cols = list(zip(*batch))
            encoded = [[e.ids for e in tok.encode_batch(list(col))] for col in cols]
            for row in zip(*encoded):
                if index % shard_size == 0:
                    shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0, "num_tokens": 0})
                sample = {"ids": row[0]} if objective == "span" else {"src": row[0], "tgt": row[1]}
                writer.write({"__key__": f"{index:010d}", "json": json.dumps(sample).encode()})
                shards[-1]["num_samples"] += 1
                shards[-1]["num_tokens"] += sum(len(r) for r in row)
                index += 1
            bar.update(len(batch))
    finally:
        writer.close()
        bar.close()
    return {"objective": objective, "num_samples": index, "num_tokens": sum(s["num_tokens"] for s in shards),
            "shards": shards}


def _batched(it, n):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
