"""The data stream on real tokenizer + real tar shards: global order, exact resume on any layout,
packing, bucketing, mixtures, validation. Ranks are DataStream(dp_rank=r, dp_size=dp) objects (the
same code path as real ranks, which differ by those numbers only); one test uses real gloo ranks."""
import json
import os
import random
import signal
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import webdataset as wds

from data.mixture import Component, largest_remainder
from data.packing import pack_block
from data.prepare import prepare
from data.tar import iter_samples
from data.stream import DataStream, resolve_shards, steps_in_epoch
from tests.data_helpers import stream_spec
from data.tokenizer import SENTINEL_BASE
from tests.test_objectives import _reassemble

WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this had "
         "not but one all were they their has been have who more two other after new first into").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A span corpus (200 documents, 4 shards of 50) and a pairs corpus (200 pairs: 60, 60, 60, 20)."""
    root = tmp_path_factory.mktemp("data")
    rnd = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 60)))
                                             for _ in range(200)) + "\n")
    lengths = [rnd.randint(1, 30) for _ in range(200)]                 # a target about as long as its source
    (root / "pairs.jsonl").write_text("\n".join(json.dumps({
        "src": " ".join(rnd.choice(WORDS) for _ in range(n)),
        "tgt": " ".join(rnd.choice(WORDS) for _ in range(max(1, n + rnd.randint(-2, 2))))}) for n in lengths) + "\n")
    prepare([str(root / "text.txt")], str(root / "span"), objective="span", vocab_size=300, shard_size=50,
            progress=False)
    prepare([str(root / "pairs.jsonl")], str(root / "pairs"), objective="pairs", tokenizer=str(root / "span"),
            shard_size=60, progress=False)
    return {"span": str(root / "span"), "pairs": str(root / "pairs"), "root": root}


def make_spec(kind, data, **kw):
    base = dict(num_streams=4, shuffle_block=16, seed=3, global_batch=8, max_src_len=48, max_tgt_len=40)
    base.update(kw)
    if kind == "span":
        return stream_spec(shards=resolve_shards(data["span"]), objective="span", **base)
    if kind == "pairs":
        return stream_spec(shards=resolve_shards(data["pairs"]), objective="pairs", **{"bucket_window": 2, **base})
    comps = [Component("text", resolve_shards(data["span"]), "span", 0.7),
             Component("mt", resolve_shards(data["pairs"]), "pairs", 0.3)]
    return stream_spec(components=comps, **{"bucket_window": 2, **base})


def run(spec, dp, steps, state=None, workers=0, mb=2):
    """Every rank of a dp x workers layout for `steps` optimizer steps from `state`.

    -> (per step: sorted (key, src bytes, labels bytes) of the whole global batch, batches of rank 0, state)
    """
    accum = spec.global_batch // (mb * dp)
    streams = [DataStream(spec, r, dp, mb, workers) for r in range(dp)]
    its = []
    for s in streams:
        if state:
            s.load_state_dict(state)
        its.append(iter(s))
    per_step, rank0 = [], []
    for _ in range(steps):
        rows = []
        for r, it in enumerate(its):
            for _ in range(accum):
                b = next(it)
                if r == 0:
                    rank0.append(b)
                for k, src, m, lab in zip(b["keys"], b["src"], b["src_mask"], b["labels"]):
                    rows.append((k, src[m].numpy().tobytes(), lab[lab != -100].numpy().tobytes()))
        per_step.append(sorted(rows))
    states = {json.dumps({k: v for k, v in s.state_dict().items() if k != "counters"}) for s in streams}
    assert len(states) == 1, states
    return per_step, rank0, streams[0].state_dict()


@contextmanager
def time_limit(seconds):
    def boom(*_):
        raise TimeoutError(f"stream did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("kind", ["span", "pairs", "mixture"])
def test_resume_on_any_layout_consumes_exactly_the_rest(data, kind):
    spec = make_spec(kind, data)
    S, k = 30, 11                                          # 30 steps of 8 cross an epoch end (~24 steps)
    ref, _, _ = run(spec, dp=2, steps=S)
    head, _, state = run(spec, dp=2, steps=k)
    assert head == ref[:k] and (state["epoch"], state["cursor"]) == (0, k * 8)
    for dp in (1, 4):                                      # 2 -> 1 and 2 -> 4 ranks
        tail, _, _ = run(spec, dp=dp, steps=S - k, state=state)
        assert head + tail == ref, f"dp 2 -> {dp}"
    all_ref = Counter(r[0] for step in ref for r in step)
    all_resumed = Counter(r[0] for step in head + tail for r in step)
    assert all_resumed == all_ref


def test_resume_with_fewer_loader_workers(data):
    spec = make_spec("span", data)
    ref, _, _ = run(spec, dp=2, steps=16)
    head, _, state = run(spec, dp=2, steps=6, workers=2)
    tail, _, _ = run(spec, dp=2, steps=10, workers=1, state=state)
    assert head + tail == ref


def test_resumed_span_batches_are_byte_identical(data):
    spec = make_spec("span", data)
    _, ref, _ = run(spec, dp=2, steps=12)
    _, head, state = run(spec, dp=2, steps=5)
    _, tail, _ = run(spec, dp=2, steps=7, state=state)
    assert len(head + tail) == len(ref)
    for a, b in zip(head + tail, ref):
        assert a["keys"] == b["keys"]
        for name in ("src", "src_mask", "tgt_in", "labels"):
            assert torch.equal(a[name], b[name]), name
    # and the examples really are span-corrupted: sentinels in the inputs, targets start with one
    assert all((b["labels"][:, 0] == SENTINEL_BASE).all() for b in ref)


def test_ranks_in_real_processes_match_the_single_process_order(data, tmp_path, port):
    """Two gloo processes, each its own DataStream, resumed mid-epoch: their global batches, gathered,
    equal one process reading the same steps."""
    out = tmp_path / "gathered.json"
    torch.multiprocessing.start_processes(_gloo_rank, args=(2, port, data["pairs"], str(out)), nprocs=2,
                                          join=True, start_method="fork")
    got = json.loads(out.read_text())
    spec = make_spec("pairs", data)
    ref, _, _ = run(spec, dp=1, steps=6, state={"epoch": 0, "cursor": 16})
    assert got == [[r[0] for r in step] for step in ref]


def _gloo_rank(rank, world, port, pairs, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = make_spec("pairs", {"pairs": pairs})
    s = DataStream(spec, rank, world, micro_batch=2)
    s.load_state_dict({"epoch": 0, "cursor": 16})
    it = iter(s)
    steps = []
    for _ in range(6):
        keys = [k for _ in range(2) for k in next(it)["keys"]]
        gathered = [None] * world
        dist.all_gather_object(gathered, keys)
        steps.append(sorted(k for part in gathered for k in part))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(steps, f)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- uneven shards

def _write_pair_shards(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    shards, i = [], 0
    for n_shard, n in enumerate(sizes):
        name = f"part-{n_shard:03d}.tar"
        with wds.TarWriter(os.path.join(folder, name)) as w:
            for _ in range(n):
                src, tgt = rng.integers(3, 200, rng.integers(2, 12)).tolist(), rng.integers(3, 200, 5).tolist()
                w.write({"__key__": f"s{i:05d}", "json": json.dumps({"src": src + [1], "tgt": tgt + [1]}).encode()})
                i += 1
        shards.append({"name": name, "num_samples": n, "num_tokens": 0})
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"objective": "pairs", "shards": shards}, f)
    return folder


@pytest.mark.parametrize("sizes,streams", [((7, 13, 4), 4), ((9, 2, 14), 8)])
def test_uneven_shards_finish_the_epoch_on_every_rank(tmp_path, sizes, streams):
    """3 shards of different sizes, 2 ranks x 2 workers (more readers than shards): each rank
    yields the same number of micro-batches, an epoch holds every sample once (but the < V
    left over), and nothing waits forever."""
    folder = _write_pair_shards(str(tmp_path / "uneven"), sizes)
    spec = stream_spec(shards=resolve_shards(folder), objective="pairs", num_streams=streams, shuffle_block=4,
                      seed=1, global_batch=4, max_src_len=16, max_tgt_len=8)
    n = sum(sizes)
    steps = steps_in_epoch(spec)
    assert spec.epoch_positions == n // streams * streams
    with time_limit(60):
        per_step, _, state = run(spec, dp=2, steps=2 * steps, workers=2)
    epoch0 = [r[0] for step in per_step[:steps] for r in step]
    assert len(epoch0) == len(set(epoch0)) == steps * 4
    assert n - len(epoch0) < streams + 4
    assert state["epoch"] == (2 * steps * 4) // spec.epoch_positions


# ----------------------------------------------------------------------------- packing and bucketing

def test_pack_block_fills_every_chunk():
    docs = [np.arange(0, 5), np.arange(10, 13), None, np.arange(20, 27)]
    keys = ["a", "b", "bad", "c"]
    chunks, (dropped, repeated) = pack_block(docs, keys, 3, 4)
    assert [k for k, _ in chunks] == ["a@0", "a@4", "c@0"]
    assert np.concatenate([t for _, t in chunks]).tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 23]
    assert (dropped, repeated) == (3, 0)
    chunks, (dropped, repeated) = pack_block(docs, keys, 5, 4)            # 15 tokens for 20 slots
    assert [k for k, _ in chunks][3:] == ["c@4", "a@1"] and (dropped, repeated) == (0, 5)


def test_packed_examples_are_the_documents_laid_end_to_end(data):
    """Unshuffled, one stream, one global batch = the K examples of the first block: un-masked and
    laid end to end they are the block's 16 documents (without </s>) laid end to end, cut at
    K x raw length (or started again if short); every example has the full input length."""
    K = make_spec("span", data, num_streams=1, shuffle=False).geometry[0].K
    spec = make_spec("span", data, num_streams=1, shuffle=False, global_batch=K)
    docs = [json.loads(raw["json"])["ids"][:-1] for _, raw in iter_samples(resolve_shards(data["span"])[0].url)]
    flat = np.concatenate(docs[:16])
    expect = np.tile(flat, -(-K * spec.raw_len // len(flat)))[:K * spec.raw_len].tolist()
    b = next(iter(DataStream(spec, 0, 1, micro_batch=K)))
    assert b["pad_frac"] == 0.0 and b["src"].shape == (K, 48) and b["src_mask"].all()
    got = [t for src, lab in zip(b["src"].tolist(), b["labels"].tolist()) for t in _reassemble(src, lab)]
    assert got == expect


def test_length_bucketing_cuts_padding(data):
    pads = {}
    for window in (0, 4):
        spec = make_spec("pairs", data, bucket_window=window, global_batch=16, max_src_len=64, max_tgt_len=64)
        s = DataStream(spec, 0, 2, micro_batch=4)
        it = iter(s)
        for _ in range(steps_in_epoch(spec) * 2):
            next(it)
        pads[window] = s.pad_frac
    assert pads[4] < 0.6 * pads[0], pads


# ----------------------------------------------------------------------------- mixtures

def test_mixture_weights_hold_and_micro_batches_stay_homogeneous(data):
    spec = make_spec("mixture", data, global_batch=16)
    per_step, batches, _ = run(spec, dp=1, steps=200, mb=4)          # 3,200 samples
    keys = [r[0] for step in per_step for r in step]
    frac = sum(k.startswith("text/") for k in keys) / len(keys)
    assert abs(frac - 0.7) < 0.015, frac                               # stated tolerance: 1.5 points
    mixed = sum(len({k.split("/")[0] for k in b["keys"]}) > 1 for b in batches)
    assert mixed <= len(per_step)                                      # at most one per global batch
    again, _, _ = run(spec, dp=1, steps=20, mb=4)
    assert again == per_step[:20]


def test_largest_remainder_is_exact():
    assert largest_remainder(np.array([0.7, 0.3]), 256).tolist() == [179, 77]
    assert largest_remainder(np.array([1.0, 1.0, 1.0]), 10).sum() == 10


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kind", ["pairs", "span"])
def test_validation_is_one_ordered_pass_identical_on_every_layout(data, kind):
    views = []
    for dp, mb in ((1, 8), (3, 4), (2, 1)):
        spec = make_spec(kind, data, num_streams=3, shuffle=False, global_batch=dp * mb)
        rows = []
        for r in range(dp):
            s = DataStream(spec, r, dp, mb)
            for b in s:                                    # a finite pass
                assert torch.equal(b["labels"][[k == "" for k in b["keys"]]],
                                   torch.full_like(b["labels"][[k == "" for k in b["keys"]]], -100))
                rows += [(k, x[m].numpy().tobytes(), y[y != -100].numpy().tobytes())
                         for k, x, m, y in zip(b["keys"], b["src"], b["src_mask"], b["labels"]) if k]
            assert s.g == steps_in_epoch(spec) * spec.global_batch
        views.append(sorted(rows))
    assert views[0] == views[1] == views[2]
    keys = [r[0] for r in views[0]]
    assert len(keys) == len(set(keys))
    if kind == "pairs":
        assert len(keys) == 200                            # every sample once (3 streams of 67, one short)
