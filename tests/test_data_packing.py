"""Exact packing (length indexes): no token dropped or repeated on a skewed, grouped corpus; exact,
byte-identical resume across dp and worker counts; old folders without indexes still read."""
import json
import os

import numpy as np
import pytest
import webdataset as wds

from data.packed import INDEX_DTYPE, index_name
from data.stream import Layout, resolve_shards
from tests.data_helpers import stream_spec
from tests.test_data_stream import run


def write_ids(folder, docs, per_shard, index=True, bad=None):
    """Token-id shards in the prepared layout (KEY.json = {"ids": [... </s>]}), with length indexes;
    bad = {document number: the .json member written instead} (the index keeps the true length)."""
    os.makedirs(folder, exist_ok=True)
    shards = []
    for s in range(0, len(docs), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        part = docs[s:s + per_shard]
        with wds.TarWriter(os.path.join(folder, name)) as w:
            for i, d in enumerate(part):
                member = (bad or {}).get(s + i, json.dumps({"ids": list(map(int, d)) + [1]}).encode())
                w.write({"__key__": f"{s + i:010d}", "json": member})
        e = {"name": name, "num_samples": len(part), "num_tokens": sum(len(d) + 1 for d in part)}
        if index:
            e["index"], e["doc_tokens"] = index_name(name), sum(len(d) for d in part)
            with open(os.path.join(folder, e["index"]), "wb") as f:
                f.write(np.array([len(d) for d in part], dtype=INDEX_DTYPE).tobytes())
        shards.append(e)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"objective": "span", "shards": shards}, f)
    return folder


def skewed_docs():
    """100 documents of 5,000 tokens, then 5,000 of 20: every token id is unique (1000 + its index)."""
    lengths = [5000] * 100 + [20] * 5000
    ids = np.arange(1000, 1000 + sum(lengths))
    return np.split(ids, np.cumsum(lengths)[:-1])


def epoch_counts(spec, n_ids):
    """How often each token id appears in the raw (uncorrupted) chunks of epoch 0."""
    lay = Layout(spec)
    counts = np.zeros(n_ids + 1000, dtype=np.int64)
    for g in range(spec.epoch_positions):
        c, v, e, i = lay.locate(g)
        item = lay.reader(c, v).item(e, i)
        assert e == 0 and item is not None
        counts += np.bincount(item[1], minlength=len(counts))
    return counts[1000:], lay.stats


@pytest.mark.parametrize("block", [256])
def test_skewed_grouped_corpus_loses_no_token(tmp_path, block):
    docs = skewed_docs()
    n = sum(len(d) for d in docs)
    spec = stream_spec(shards=resolve_shards(write_ids(str(tmp_path / "c"), docs, 1000)), objective="span",
                      num_streams=8, shuffle_block=block, seed=5, global_batch=8, max_src_len=512, max_tgt_len=128)
    assert spec.geometry[0].exact and spec.epoch_positions == -(-n // spec.raw_len)
    counts, _ = epoch_counts(spec, n)
    dropped, repeated = int((counts == 0).sum()), int(np.clip(counts - 1, 0, None).sum())
    assert dropped + repeated <= 0.001 * n, (dropped, repeated)
    # the old per-block chunk counts (a folder without indexes) lose a lot on this corpus: the check can fail
    old = stream_spec(shards=resolve_shards(write_ids(str(tmp_path / "o"), docs, 1000, index=False)),
                     objective="span", num_streams=8, shuffle_block=block, seed=5, global_batch=8,
                     max_src_len=512, max_tgt_len=128)
    assert not old.geometry[0].exact
    lay = Layout(old)
    for g in range(old.epoch_positions):
        lay.reader(*lay.locate(g)[:2]).item(*lay.locate(g)[2:])
    assert lay.stats["dropped_tokens"] + lay.stats["repeated_tokens"] > 0.05 * n, lay.stats


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A small grouped corpus: 12 long documents (300-700 tokens) then 300 short ones (3-30)."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(200, 300, rng.integers(300, 700)) for _ in range(12)]
    docs += [rng.integers(200, 300, rng.integers(3, 30)) for _ in range(300)]
    return write_ids(str(tmp_path_factory.mktemp("grouped")), docs, 50)


def test_exact_packing_resumes_byte_identical_across_dp_and_workers(grouped):
    spec = stream_spec(shards=resolve_shards(grouped), objective="span", num_streams=6, shuffle_block=16, seed=3,
                      global_batch=12, max_src_len=48, max_tgt_len=40)
    steps = spec.epoch_positions // 12
    S = steps + 4                                            # crosses the epoch end
    ref, _, _ = run(spec, dp=2, steps=S)
    a, _, st1 = run(spec, dp=2, steps=5, workers=0)
    b, _, st2 = run(spec, dp=3, steps=S - 12, workers=2, state=st1)
    c, _, _ = run(spec, dp=3, steps=7, workers=1, state=st2)
    assert a + b + c == ref
    keys = [r[0] for step in ref[:steps] for r in step]
    assert len(keys) == len(set(keys))                       # an epoch: every chunk once


def test_validation_covers_every_token_once(grouped):
    spec = stream_spec(shards=resolve_shards(grouped), objective="span", num_streams=3, shuffle_block=16,
                      shuffle=False, global_batch=4, max_src_len=48, max_tgt_len=40)
    n = sum(s.doc_tokens for s in spec.components[0].shards)
    lay = Layout(spec)
    got = [lay.reader(*lay.locate(g)[:2]).item(*lay.locate(g)[2:])[1] for g in range(spec.epoch_positions)]
    assert sum(len(x) for x in got) == n and sum(len(x) != spec.raw_len for x in got) <= 1


def test_segment_ids_follow_the_documents(tmp_path):
    """data.pack_attention: src_segments number each token's document inside its example; the
    sentinels and </s> included. Token ids are unique, so every token's document is known."""
    rng = np.random.default_rng(2)
    lengths = [int(n) for n in rng.integers(2, 90, 120)]
    ids = np.arange(1000, 1000 + sum(lengths))
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    doc_of = np.repeat(np.arange(len(docs)), lengths)
    spec = stream_spec(shards=resolve_shards(write_ids(str(tmp_path / "c"), docs, 40)), objective="span",
                      num_streams=2, shuffle_block=8, seed=1, global_batch=8, max_src_len=48, max_tgt_len=40,
                      pack_attention=True)
    _, batches, _ = run(spec, dp=1, steps=6, mb=4)
    multi = 0
    for b in batches:
        seg, src, m = b["src_segments"], b["src"], b["src_mask"]
        assert seg.shape == src.shape and (seg[~m] == -1).all()
        for row_seg, row, row_m in zip(seg.tolist(), src.tolist(), m.tolist()):
            n = sum(row_m)
            assert row_seg[:n] == sorted(row_seg[:n]) and row_seg[0] == 0       # documents in order
            pairs = {(s, int(doc_of[t - 1000])) for s, t in zip(row_seg[:n], row[:n]) if t >= 1000}
            assert len({s for s, _ in pairs}) == len(pairs) == len({d for _, d in pairs})   # one document per id
            multi += len(pairs) > 1
    assert multi > 0
    spec_off = stream_spec(shards=spec.components[0].shards, objective="span", num_streams=2, shuffle_block=8, seed=1,
                          global_batch=8, max_src_len=48, max_tgt_len=40)
    _, off, _ = run(spec_off, dp=1, steps=6, mb=4)
    assert all("src_segments" not in b and (a["src"] == b["src"]).all() for a, b in zip(batches, off))


def test_old_folder_gets_an_index(tmp_path):
    """A folder prepared without indexes reads with the old packing, and `python -m data.index`
    makes it exact: the same index prepare would have written."""
    import subprocess
    import sys
    rng = np.random.default_rng(4)
    docs = [rng.integers(200, 300, rng.integers(2, 60)) for _ in range(90)]
    old = write_ids(str(tmp_path / "old"), docs, 40, index=False)
    new = write_ids(str(tmp_path / "new"), docs, 40)
    kw = dict(objective="span", num_streams=2, shuffle_block=8, global_batch=4, max_src_len=32, max_tgt_len=30)
    assert not stream_spec(shards=resolve_shards(old), **kw).geometry[0].exact
    r = subprocess.run([sys.executable, "-m", "data.index", old], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(old, "manifest.json")) as f, open(os.path.join(new, "manifest.json")) as g:
        assert json.load(f)["shards"] == json.load(g)["shards"]
    for name in sorted(n for n in os.listdir(new) if n.endswith(".len")):
        assert open(os.path.join(old, name), "rb").read() == open(os.path.join(new, name), "rb").read(), name
    assert stream_spec(shards=resolve_shards(old), **kw).geometry[0].exact


def test_bad_documents_become_placeholders_and_nothing_moves(tmp_path):
    """A document that does not decode, or whose length differs from its index: the chunks that
    touch it are placeholders (counted), every other token is still read exactly once."""
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(5, 80, 150)]
    ids = np.arange(1000, 1000 + sum(lengths))
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    bad = {7: b'{"ids": [1, 2', 60: json.dumps({"ids": list(map(int, docs[60][:3])) + [1]}).encode()}
    kw = dict(objective="span", num_streams=3, shuffle_block=16, seed=2, global_batch=6, max_src_len=48, max_tgt_len=40)
    good = stream_spec(shards=resolve_shards(write_ids(str(tmp_path / "g"), docs, 50)), **kw)
    spec = stream_spec(shards=resolve_shards(write_ids(str(tmp_path / "b"), docs, 50, bad=bad)), **kw)
    assert spec.epoch_positions == good.epoch_positions
    lay_g, lay_b = Layout(good), Layout(spec)
    n_none = 0
    for g in range(spec.epoch_positions):
        a = lay_g.reader(*lay_g.locate(g)[:2]).item(*lay_g.locate(g)[2:])
        b = lay_b.reader(*lay_b.locate(g)[:2]).item(*lay_b.locate(g)[2:])
        if b is None:
            n_none += 1
            assert {int(t) - 1000 for t in a[1]} & set(range(sum(lengths[:7]), sum(lengths[:8]))) or \
                {int(t) - 1000 for t in a[1]} & set(range(sum(lengths[:60]), sum(lengths[:61])))
        else:
            assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert 2 <= n_none <= 6 and lay_b.bad.count == 2
