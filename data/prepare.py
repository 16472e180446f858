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

import numpy as np

from data.corpus import CorpusError, read_records
from data.packed import INDEX_DTYPE, doc_length, index_name
from data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from common.atomic import atomic_dir

MANIFEST = "manifest.json"


def _records(inputs, objective, fields):
    return itertools.chain.from_iterable(read_records(p, objective, *fields) for p in inputs)


def prepare(inputs: list[str], out_dir: str, objective: str = "span", tokenizer: str | None = None,
            vocab_size: int = 8000, shard_size: int = 10000, text_field: str = "text", src_field: str = "src",
            tgt_field: str = "tgt", overwrite: bool = False, progress: bool = True) -> dict:
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
            tok = load_tokenizer(src_tok)
            shutil.copyfile(src_tok, tok_path)
        else:
            texts = (t for rec in _records(inputs, objective, fields) for t in rec)
            tok = train_tokenizer(texts, vocab_size)
            tok.save(tok_path)
        manifest = _write_shards(tok, _records(inputs, objective, fields), n_records, tmp, objective,
                                 shard_size, progress)
        manifest.update(tokenizer_sha256=tokenizer_hash(tok_path), vocab_size=tok.get_vocab_size(),
                        inputs=[os.path.abspath(p) for p in inputs], created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _write_shards(tok, records, n_records, out, objective, shard_size, progress) -> dict:
    shards, batch, lengths = [], [], []
    bar = tqdm(total=n_records, unit="rec", desc="prepare", disable=not progress, mininterval=1.0)
    writer = wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxcount=shard_size, verbose=0)
    index = 0
    try:
        for batch in _batched(records, 1000):
            cols = list(zip(*batch))
            encoded = [[e.ids for e in tok.encode_batch(list(col))] for col in cols]
            for row in zip(*encoded):
                if index % shard_size == 0:
                    _close_index(out, shards, lengths)
                    shards.append({"name": f"shard-{len(shards):06d}.tar", "num_samples": 0, "num_tokens": 0})
                sample = {"ids": row[0]} if objective == "span" else {"src": row[0], "tgt": row[1]}
                writer.write({"__key__": f"{index:010d}", "json": json.dumps(sample).encode()})
                shards[-1]["num_samples"] += 1
                shards[-1]["num_tokens"] += sum(len(r) for r in row)
                if objective == "span":
                    lengths.append(doc_length(row[0]))
                index += 1
            bar.update(len(batch))
        _close_index(out, shards, lengths)
    finally:
        writer.close()
        bar.close()
    return {"objective": objective, "num_samples": index, "num_tokens": sum(s["num_tokens"] for s in shards),
            "shards": shards}


def _close_index(out, shards, lengths):
    if shards and lengths:
        s = shards[-1]
        s["index"], s["doc_tokens"] = index_name(s["name"]), int(sum(lengths))
        with open(os.path.join(out, s["index"]), "wb") as f:
            f.write(np.asarray(lengths, dtype=INDEX_DTYPE).tobytes())
    lengths.clear()


def _batched(it, n):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk
