"""Span corruption and the text -> shards -> batches path on real tokenizer and real tar shards."""
import json

import numpy as np
import pytest

from data.objectives import collate, span_corrupt
from data.prepare import prepare
from data.stream import DataStream, resolve_shards
from tests.data_helpers import stream_spec
from data.tokenizer import EOS_ID, SENTINEL_BASE, load_tokenizer


def _reassemble(inp, tgt, sentinels=None):
    """Puts each target span back in place of its sentinel (sentinel ids: the project's own by default)."""
    sentinels = set(range(SENTINEL_BASE, SENTINEL_BASE + 100)) if sentinels is None else sentinels
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inp[:-1]:
        out.extend(spans[t] if t in spans else [t])
    return out


@pytest.mark.parametrize("seed", range(20))
def test_span_corruption_reassembles(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(200, 400, size=int(rng.integers(2, 300)))
    inp, tgt = span_corrupt(ids, 0.15, 3.0, 100, np.random.default_rng(seed))
    assert inp[-1] == EOS_ID and tgt[-1] == EOS_ID
    assert _reassemble(list(inp), list(tgt)) == list(ids)
    n_noise = sum(1 for t in tgt[:-1] if not SENTINEL_BASE <= t < SENTINEL_BASE + 100)
    assert n_noise == max(1, min(round(len(ids) * 0.15), len(ids) - 1))


def test_span_corruption_is_deterministic_in_its_rng():
    ids = np.arange(100, 180)
    a = span_corrupt(ids, 0.15, 3.0, 100, np.random.default_rng([1, 2, 3]))
    b = span_corrupt(ids, 0.15, 3.0, 100, np.random.default_rng([1, 2, 3]))
    assert all((x == y).all() for x, y in zip(a, b))


def test_text_to_shards_to_batches_recovers_token_ids(tmp_path):
    rows = [{"src": f"source number {i} with words", "tgt": f"target {i} 目标"} for i in range(37)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    man = prepare([str(corpus)], str(tmp_path / "out"), objective="pairs", vocab_size=300, shard_size=10,
                  progress=False)
    assert man["num_samples"] == 37 and len(man["shards"]) == 4
    tok = load_tokenizer(str(tmp_path / "out"))
    expect = {}
    for i, r in enumerate(rows):
        expect[f"{i:010d}"] = (tok.encode(r["src"]).ids, tok.encode(r["tgt"]).ids)
    spec = stream_spec(shards=resolve_shards(str(tmp_path / "out")), objective="pairs", num_streams=3,
                      shuffle_block=4, seed=0, global_batch=4, max_src_len=64, max_tgt_len=64,
                      noise_density=0.15, mean_span_length=3.0)
    stream = iter(DataStream(spec, dp_rank=0, dp_size=1, micro_batch=4))
    seen = 0
    for _ in range(9):                                 # 36 // 3 streams = 12 per stream -> 36 -> 9 batches
        b = next(stream)
        for k, src, m, tin, lab in zip(b["keys"], b["src"], b["src_mask"], b["tgt_in"], b["labels"]):
            s, t = expect[k]
            assert src[m].tolist() == s
            assert lab[lab != -100].tolist() == t
            assert tin[0].item() == 0 and tin[1:len(t)].tolist() == t[:-1]
            seen += 1
    assert seen == 36


def test_collate_pads_and_masks():
    b = collate([{"key": "a", "src": np.array([5, 6, 1]), "tgt": np.array([7, 1])},
                 {"key": "b", "src": np.array([5, 1]), "tgt": np.array([8, 9, 1])}], 10, 10)
    assert b["src"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert b["src_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert b["labels"].tolist() == [[7, 1, -100], [8, 9, 1]]
    assert b["tgt_in"].tolist() == [[0, 7, 0], [0, 8, 9]]
