"""Where shards come from (local, brace patterns, globs, pipe:, fsspec file:// and memory://,
explicit manifests) and what bad data does: skipped, counted, logged with its shard, then a clear
error past data.max_bad_samples; sources that match nothing fail at start."""
import json
import logging
import os
import shutil

import fsspec
import numpy as np
import pytest
import webdataset as wds

from data.resolve import check_data
from data.sources import DataError, resolve_source
from data.stream import DataStream, steps_in_epoch
from tests.data_helpers import stream_spec
from launcher.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(rng, key):
    src, tgt = rng.integers(3, 200, rng.integers(2, 10)).tolist(), rng.integers(3, 200, 4).tolist()
    return {"__key__": key, "json": json.dumps({"src": src + [1], "tgt": tgt + [1]}).encode()}


def write_shards(folder, sizes, bad=None, seed=0):
    """Pair shards part-NNN.tar + manifest.json; bad = {sample index: member dict} replaces samples."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    shards, i = [], 0
    for s, n in enumerate(sizes):
        name = f"part-{s:03d}.tar"
        with wds.TarWriter(os.path.join(folder, name)) as w:
            for _ in range(n):
                smp = _sample(rng, f"s{i:04d}")
                if bad and i in bad:
                    smp = {"__key__": f"s{i:04d}", **bad[i]}
                w.write(smp)
                i += 1
        shards.append({"name": name, "num_samples": n, "num_tokens": 0})
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"objective": "pairs", "shards": shards}, f)
    return folder


def epoch_keys(shards, num_workers=0, streams=2, **kw):
    spec = stream_spec(shards=shards, objective="pairs", num_streams=streams, shuffle_block=4, seed=0, global_batch=4,
                      max_src_len=16, max_tgt_len=8, **kw)
    s = DataStream(spec, 0, 1, micro_batch=2, num_workers=num_workers)
    it = iter(s)
    batches = [next(it) for _ in range(steps_in_epoch(spec) * 2)]
    return [k for b in batches for k in b["keys"]], batches, s


@pytest.fixture
def shards_dir(tmp_path):
    return write_shards(str(tmp_path / "ds"), (5, 7, 4, 8))


# ----------------------------------------------------------------------------- sources

def test_every_kind_of_source_reads_the_same_samples(shards_dir, tmp_path):
    ref = sorted(epoch_keys(resolve_source(shards_dir))[0])
    assert len(ref) == 24
    pattern = os.path.join(shards_dir, "part-{000..003}.tar")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(shards_dir, elsewhere)
    os.remove(elsewhere / "manifest.json")
    mem = fsspec.filesystem("memory")
    for name in os.listdir(shards_dir):
        with open(os.path.join(shards_dir, name), "rb") as f:
            mem.pipe(f"/encdec-test/{name}", f.read())
    sources = {
        "manifest path": (os.path.join(shards_dir, "manifest.json"), ""),
        "brace pattern": (pattern, ""),
        "glob": (os.path.join(shards_dir, "part-*.tar"), ""),
        "two patterns": (os.path.join(shards_dir, "part-{000..001}.tar") + "::" +
                         os.path.join(shards_dir, "part-{002..003}.tar"), ""),
        "pipe:cat": ("pipe:cat " + pattern, ""),
        "file://": ("file://" + pattern, ""),
        "memory://": ("memory://encdec-test/part-{000..003}.tar", ""),
        "explicit manifest": (str(elsewhere / "part-{000..003}.tar"), os.path.join(shards_dir, "manifest.json")),
    }
    try:
        for what, (src, man) in sources.items():
            shards = resolve_source(src, man)
            assert [s.num_samples for s in shards] == [5, 7, 4, 8], what
            assert sorted(epoch_keys(shards)[0]) == ref, what
    finally:
        mem.rm("/encdec-test", recursive=True)


def test_sources_that_match_nothing_fail_at_start(shards_dir, tmp_path):
    cases = {
        str(tmp_path / "none-{000..003}.tar"): "matches nothing",
        str(tmp_path / "*.tar"): "matches nothing",
        str(tmp_path / "empty"): "no manifest.json",
        "memory://encdec-nothing/part-{000..001}.tar": "cannot read memory://encdec-nothing/manifest.json",
        os.path.join(shards_dir, "part-{000..004}.tar"): "not listed in the manifest",
    }
    os.makedirs(tmp_path / "empty")
    for src, msg in cases.items():
        with pytest.raises(DataError, match=msg):
            resolve_source(src)
    os.remove(os.path.join(shards_dir, "part-002.tar"))
    with pytest.raises(DataError, match="shard not found: .*part-002.tar"):
        resolve_source(shards_dir)


def test_config_check_fails_before_any_process_group(shards_dir, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/test-tiny.yaml"), [f"data.train={tmp_path}/x-{{0..3}}.tar"])
    with pytest.raises(DataError, match="matches nothing"):
        check_data(cfg.data)
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight"):
        load_config(os.path.join(ROOT, "configs/test-tiny.yaml"),
                    [f"data.mixture=[{{source: {shards_dir}, weight: 1}}, {{source: {shards_dir}, weight: -1}}]"])
    with pytest.raises(ConfigError, match="either data.train or data.mixture"):
        load_config(os.path.join(ROOT, "configs/test-tiny.yaml"),
                    [f"data.train={shards_dir}", f"data.mixture=[{{source: {shards_dir}}}]"])


def test_mixture_from_the_config(tmp_path):
    """data.mixture through the trainer's inputs: prepared span + pairs data, the tokenizer found in the first."""
    from data.prepare import prepare
    from launcher.training.inputs import resolve_inputs
    (tmp_path / "t.txt").write_text("\n".join(f"line {i} " + "word " * (i % 17) for i in range(80)) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"src": f"a {i}", "tgt": f"b {i}"}) for i in range(80)))
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "span"), objective="span", vocab_size=280, progress=False)
    prepare([str(tmp_path / "p.jsonl")], str(tmp_path / "pairs"), objective="pairs", tokenizer=str(tmp_path / "span"),
            progress=False)
    cfg = load_config(os.path.join(ROOT, "configs/test-tiny.yaml"), [
        f"data.mixture=[{{source: {tmp_path}/span, weight: 1, objective: span, name: text}}, "
        f"{{source: {tmp_path}/pairs, weight: 1, name: mt}}]"])
    check_data(cfg.data)
    it = iter(resolve_inputs(cfg).stream(cfg, "train", 0, 1))
    keys = [k for _ in range(16) for k in next(it)["keys"]]
    assert {k.split("/")[0] for k in keys} == {"text", "mt"}


# ----------------------------------------------------------------------------- bad data

BAD = {
    1: {"json": b'{"src": [5, 6'},                       # invalid JSON
    3: {"json": b"\xff\xfe\x00\x01"},                    # does not decode (not UTF-8)
    6: {"json": json.dumps({"src": [], "tgt": [1]}).encode()},   # empty sample
    8: {"json": b""},                                    # empty member
    9: {"txt": b"no json here"},                         # no .json member
}


def _truncate(path, keep_frac=0.55):
    data = open(path, "rb").read()
    cut = int(len(data) * keep_frac) // 512 * 512 + 100              # inside a member
    with open(path, "wb") as f:
        f.write(data[:cut])


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog, workers):
    folder = write_shards(str(tmp_path / "bad"), (10, 10), bad=BAD)
    _truncate(os.path.join(folder, "part-001.tar"))
    caplog.set_level(logging.WARNING, logger="encdec.data")
    keys, batches, stream = epoch_keys(resolve_source(folder), num_workers=workers)
    real = [k for k in keys if k]
    assert len(keys) == 20 and len(real) == len(set(real))                # every slot filled, no repeats
    assert not set(real) & {f"s{i:04d}" for i in BAD}
    missing = 20 - len(real) - len(BAD)                                   # lost to the truncation
    assert missing > 0 and all(f"s{i:04d}" in real for i in range(10) if i not in BAD)
    assert stream.skipped == len(BAD) + missing
    for b in batches:                                                     # placeholders carry no loss
        for k, lab in zip(b["keys"], b["labels"]):
            assert (lab != -100).any() == bool(k)
    if workers == 0:                                                      # (worker logs go to its stderr)
        text = caplog.text
        assert text.count("part-000.tar") == len(BAD) and "part-001.tar" in text and "truncated" in text
        for what in ("invalid JSON", "not UTF-8", "'src' is missing, empty", "empty .json member", "no .json member"):
            assert what in text, what


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path, workers):
    folder = write_shards(str(tmp_path / "bad"), (10, 10), bad=BAD)
    with pytest.raises(DataError, match=r"^\d+ bad samples, more than data.max_bad_samples=3 \(last: .*part-000.tar"):
        epoch_keys(resolve_source(folder), num_workers=workers, max_bad_samples=3)


def test_a_failing_pipe_counts_as_an_unreadable_shard(shards_dir, caplog):
    shards = resolve_source("pipe:cat " + os.path.join(shards_dir, "part-{000..003}.tar"))
    os.remove(os.path.join(shards_dir, "part-001.tar"))                  # gone after the start check
    caplog.set_level(logging.WARNING, logger="encdec.data")
    keys, _, stream = epoch_keys(shards)
    assert stream.skipped == 7 and keys.count("") == 7
    assert "part-001.tar" in caplog.text and "exited with status" in caplog.text
