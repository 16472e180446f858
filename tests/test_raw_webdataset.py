"""Webdataset corpora written by another pipeline (the stock wds.ShardWriter: {"txt": doc} or {"json":
{"text": doc}}, pairs as {"json": {"src", "tgt"}}), with no manifest, trained on directly: counted
by a scan, tokenized by the loader workers, with the guarantees of prepared data (one pass over
every document per epoch, exact resume on another layout) and the token stream `encdec prepare`
gives for the same shards. Real text (license texts then docstrings: grouped by source, uneven)."""
import glob
import gzip
import json
import os
import sys

import numpy as np
import pytest
import webdataset as wds

from data.config import DataConfig
from data.prepare import prepare
from data.resolve import Where, check_data
from data.spec import StreamSpec, vocab_of
from data.stream import Layout
from data.synthetic import chinese, english
from data.tar import iter_samples
from data.tokenizer import load_tokenizer
from data.ul2 import Denoiser
from tests.ckpt_helpers import metrics, run_ranks, train
from tests.conftest import run_cli
from tests.test_data_stream import run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from real_text import collect  # noqa: E402

PER_SHARD = 45
SETTINGS = dict(num_streams=4, shuffle_block=16, seed=3, max_src_len=40, max_tgt_len=32)


def _write(pattern, samples):
    with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as w:
        for s in samples:
            w.write(s)
    return sorted(glob.glob(pattern.replace("%06d", "*")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as .txt and as .json {"text"} shards, pairs shards, and each prepared by
    `encdec prepare` from the .txt / pairs tars themselves (one prepared shard per tar)."""
    root = tmp_path_factory.mktemp("raw")
    docs = collect(max_chars=60_000, license_chars=25_000)
    os.makedirs(root / "txt")
    os.makedirs(root / "json")
    os.makedirs(root / "pairs")
    txt = _write(str(root / "txt" / "shard-%06d.tar"),
                 ({"__key__": f"doc{i:05d}", "txt": d} for i, d in enumerate(docs)))
    _write(str(root / "json" / "shard-%06d.tar"), ({"__key__": f"doc{i:05d}", "json": {"text": d}}
                                                   for i, d in enumerate(docs)))
    nums = np.random.default_rng(0).permutation(10000)[:150]
    pairs = _write(str(root / "pairs" / "part-%06d.tar"), ({"__key__": f"n{n:05d}", "json": {"src": english(n),
                                                                                            "tgt": chinese(n)}}
                                                           for n in nums))
    kw = dict(shard_size=PER_SHARD, unit_bytes=1024, progress=False)     # one unit, one prepared shard per tar
    man = prepare(txt, str(root / "prep"), objective="span", vocab_size=400, **kw)
    prepare(pairs, str(root / "prep_pairs"), objective="pairs", tokenizer=str(root / "prep"), **kw)
    return {"root": root, "docs": docs, "n_pairs": len(nums), "man": man, "tok": str(root / "prep" / "tokenizer.json")}


def spec_of(corpus, source, objective="span", global_batch=8, **kw):
    d = DataConfig(train=source, objective=objective, tokenizer=corpus["tok"], **{**SETTINGS, **kw})
    found = check_data(d, Where())
    return StreamSpec(d, found.train, global_batch, True, vocab_of(found.tokenizer, d))


def tokens_only(per_step):
    """Each global batch as its (source, labels) bytes, keys left out (prepared samples are renamed)."""
    return [sorted(r[1:] for r in step) for step in per_step]


def test_prepare_reads_the_members_of_a_tar(corpus):
    """The prepared shards hold the documents of the tars' .txt members, each its tokenized text."""
    man, docs = corpus["man"], corpus["docs"]
    assert man["num_samples"] == len(docs) and man["num_bad_lines"] == 0
    assert [s["num_samples"] for s in man["shards"]] == [min(PER_SHARD, len(docs) - i)
                                                         for i in range(0, len(docs), PER_SHARD)]
    tok = load_tokenizer(corpus["tok"])
    shard = str(corpus["root"] / "prep" / "shard-000000.tar")
    first = [json.loads(raw["json"])["ids"] for _, raw in iter_samples(shard)]
    assert first[:5] == [tok.encode(d).ids for d in docs[:5]]


def test_prepare_reads_a_tar_or_gzip_by_content(corpus, tmp_path):
    """A gzipped tar named .dat (.json members, the text in "body") and gzipped lines named .txt:
    read as what they are, not as text lines."""
    docs = corpus["docs"][:30]
    with wds.TarWriter(str(tmp_path / "x.tar")) as w:
        for i, d in enumerate(docs):
            w.write({"__key__": f"d{i:03d}", "json": {"body": d, "url": "u"}})
    (tmp_path / "web.dat").write_bytes(gzip.compress((tmp_path / "x.tar").read_bytes()))
    (tmp_path / "lines.txt").write_bytes(gzip.compress(("\n".join(docs) + "\n").encode()))
    tok = load_tokenizer(corpus["tok"])
    for name, kw in (("web.dat", {"text_field": "body"}), ("lines.txt", {})):
        out = str(tmp_path / f"out-{name}")
        man = prepare([str(tmp_path / name)], out, objective="span", tokenizer=corpus["tok"], progress=False, **kw)
        ids = [json.loads(raw["json"])["ids"] for s in man["shards"] for _, raw in iter_samples(f"{out}/{s['name']}")]
        assert ids == [tok.encode(d).ids for d in docs], name


@pytest.mark.parametrize("objective", ["span", "ul2"])
def test_raw_text_trains_as_its_prepared_form(corpus, objective):
    """.txt shards and .json shards (read through `pipe:`) give the same examples, key for key; and
    the token stream of the tars prepared by `encdec prepare`, global batch for global batch."""
    root = corpus["root"]
    kw = {"ul2": [Denoiser("R", "span", 3.0, 0.15, ""), Denoiser("S", "prefix", 1.0, 0.25, "")]} \
        if objective == "ul2" else {}
    raw = spec_of(corpus, str(root / "txt"), objective, **kw)
    assert raw.components[0].raw is not None and all(s.index for s in raw.components[0].shards)
    ref, _, _ = run(raw, dp=2, steps=12)
    n_json = len(glob.glob(str(root / "json" / "*.tar")))
    piped = spec_of(corpus, f"pipe:cat {root}/json/shard-{{000000..{n_json - 1:06d}}}.tar", objective,
                    text_field="text", **kw)
    got, _, _ = run(piped, dp=2, steps=12, workers=1)
    assert got == ref
    prepared, _, _ = run(spec_of(corpus, str(root / "prep"), objective, **kw), dp=1, steps=12)
    assert tokens_only(prepared) == tokens_only(ref)


def test_raw_span_sees_every_token_once_an_epoch_and_resumes_on_another_dp(corpus):
    spec = spec_of(corpus, str(corpus["root"] / "txt"))
    tok = load_tokenizer(corpus["tok"])
    want = np.bincount(np.concatenate([tok.encode(d).ids[:-1] for d in corpus["docs"]]), minlength=512)
    lay, got = Layout(spec), np.zeros_like(want)
    for g in range(spec.epoch_positions):
        c, v, e, i = lay.locate(g)
        item = lay.reader(c, v).item(e, i)
        assert e == 0 and item is not None
        got += np.bincount(item[1], minlength=len(want))
    assert (got == want).all() and lay.bad.count == 0
    S, k = 20, 7
    ref, _, _ = run(spec, dp=2, steps=S)
    head, _, state = run(spec, dp=2, steps=k, workers=1)
    tail, _, _ = run(spec, dp=1, steps=S - k, state=state, workers=1)
    assert head + tail == ref


def test_raw_pairs_one_pass_an_epoch_resume_and_the_prepared_stream(corpus):
    root = corpus["root"]
    spec = spec_of(corpus, str(root / "pairs" / "part-{000000..000003}.tar"), "pairs")
    steps = spec.epoch_positions // 8
    per_step, _, _ = run(spec, dp=2, steps=steps, workers=1)
    keys = [r[0] for step in per_step for r in step]
    assert len(keys) == len(set(keys)) and corpus["n_pairs"] - len(keys) < 4 + 8
    head, _, state = run(spec, dp=2, steps=5)
    tail, _, _ = run(spec, dp=1, steps=steps - 5, state=state)
    assert head + tail == per_step
    prepared, _, _ = run(spec_of(corpus, str(root / "prep_pairs"), "pairs"), dp=2, steps=steps)
    assert tokens_only(prepared) == tokens_only(per_step)


def test_scan_is_cached_beside_the_shards_and_never_trusted_stale(corpus, tmp_path):
    folder = tmp_path / "c"
    os.makedirs(folder)
    docs = corpus["docs"][:60]
    _write(str(folder / "shard-%06d.tar"), ({"__key__": f"d{i}", "txt": d} for i, d in enumerate(docs)))
    first = spec_of(corpus, str(folder)).components[0].shards
    cached = sorted(os.listdir(folder / ".encdec-scan"))
    assert len(cached) == 4 and spec_of(corpus, str(folder)).components[0].shards == first
    _write(str(folder / "shard-%06d.tar"), ({"__key__": f"d{i}", "txt": d} for i, d in enumerate(docs[::-1])))
    os.utime(folder / "shard-000000.tar", ns=(1, 1))                   # rewritten: another identity
    again = spec_of(corpus, str(folder)).components[0].shards
    assert again[0].index != first[0].index and again[0].doc_tokens != first[0].doc_tokens
    assert len(os.listdir(folder / ".encdec-scan")) == 8


def test_raw_text_without_a_tokenizer_is_one_clear_error(corpus, tmp_path):
    r = run_cli(["train", "configs/test-tiny.yaml", f"data.train={corpus['root'] / 'txt'}", "data.objective=span",
                 f"out_dir={tmp_path / 'run'}"], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("encdec: error: config key 'data.tokenizer':") and "raw text" in lines[0]


def _train_raw_and_prepared(root, tok, base):
    n = len(glob.glob(os.path.join(root, "txt", "*.tar")))
    raw = (f'data.mixture=[{{source: "pipe:cat {root}/txt/shard-{{000000..{n - 1:06d}}}.tar", objective: span, '
           f'name: text}}, {{source: {root}/pairs, objective: pairs, name: mt}}]')
    prepared = (f"data.mixture=[{{source: {root}/prep, objective: span, name: text}}, "
                f"{{source: {root}/prep_pairs, objective: pairs, name: mt}}]")
    common = ("data.num_workers=1", f"data.tokenizer={tok}", "train.steps=3", "model.dropout=0.1",
              "checkpoint.every=0", "parallel.zero_stage=1", "data.max_src_len=32", "data.max_tgt_len=24")
    out = {}
    runs = (("raw", raw, None), ("prepared", prepared, None), ("resumed", raw, 1), ("resumed", raw, None))
    for name, mix, stop in runs:
        t = train("", os.path.join(base, name), mix, *common, stop_after=stop)
        out[name] = {s: [r["loss"], r["grad_norm"], r["skipped_samples"]] for s, r in metrics(t.cfg.out_dir).items()}
    return out


@pytest.mark.slow
def test_the_trainer_on_2_ranks_with_a_worker_trains_raw_shards_as_prepared_ones(corpus, tmp_path):
    """Raw .txt shards (through `pipe:`) and raw pairs, mixed, on 2 ranks with a loader worker each:
    the losses and gradient norms of the same shards prepared, step for step; stopped after step 1
    and resumed, the same again."""
    res = run_ranks(2, _train_raw_and_prepared, str(corpus["root"]), corpus["tok"], str(tmp_path), tmp=str(tmp_path))
    assert res["raw"] == res["prepared"] == res["resumed"], res
    assert len(res["raw"]) == 3 and all(v[2] == 0 for v in res["raw"].values())
