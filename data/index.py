"""Adds length indexes to a span folder prepared before they existed: `python -m data.index DIR`.

Reads every shard once, writes SHARD.len next to it (one uint32 per document: tokens without
</s>; a sample that does not decode counts 0) and adds `index` / `doc_tokens` to manifest.json
(rewritten atomically). Exact packing (data/packed.py) then applies to the folder.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from common.atomic import atomic_write
from data.packed import INDEX_DTYPE, index_name
from data.records import decode
from data.sources import MANIFEST, DataError, load_manifest_at
from data.tar import iter_samples


def add_index(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    man = load_manifest_at(path)
    if man.get("objective", "span") != "span":
        raise DataError(f"{path}: length indexes are for span (text) data, not {man.get('objective')!r}")
    for s in man["shards"]:
        lengths = []
        for key, raw in iter_samples(os.path.join(folder, s["name"])):
            doc = decode(raw, "span", s["name"], key)
            lengths.append(0 if isinstance(doc, str) else len(doc))
        if len(lengths) != s["num_samples"]:
            raise DataError(f"{s['name']}: {len(lengths)} samples, the manifest says {s['num_samples']}")
        name = index_name(os.path.basename(s["name"]))
        atomic_write(os.path.join(folder, name), np.asarray(lengths, dtype=INDEX_DTYPE).tobytes())
        s["index"], s["doc_tokens"] = name, int(sum(lengths))
    atomic_write(path, json.dumps(man, indent=1))
    return man


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m data.index PREPARED_FOLDER")
    try:
        m = add_index(sys.argv[1])
    except (DataError, OSError) as e:
        sys.exit(f"data.index: error: {e}")
    print(f"indexed {len(m['shards'])} shards, {sum(s['doc_tokens'] for s in m['shards'])} tokens in {sys.argv[1]}")
