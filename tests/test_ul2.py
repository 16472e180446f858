"""The UL2 objective on real tokenizer + real tar shards: the table's statistics, every example
reassembles, and the stream resumes exactly on another layout."""
import random
from collections import defaultdict

import pytest

from data.prepare import prepare
from data.sources import DataError
from data.stream import Layout, resolve_shards
from tests.data_helpers import stream_spec
from data.tokenizer import load_tokenizer, sentinel_ids
from data.ul2 import Denoiser, mode_ids
from tests.test_data_stream import WORDS, run

MODES = ["[NLU]", "[NLG]", "[S2S]"]
TABLE = [Denoiser("R", "span", 3.0, 0.15, "[NLU]", 1.0), Denoiser("X", "span", 8.0, 0.5, "[NLG]", 1.0),
         Denoiser("X", "span", 12.0, 0.15, "[NLG]", 0.5), Denoiser("S", "prefix", 1.0, 0.25, "[S2S]", 1.5)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ul2")
    rnd = random.Random(1)
    (root / "text.txt").write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 80)))
                                             for _ in range(1200)) + "\n")
    prepare([str(root / "text.txt")], str(root / "span"), objective="span", vocab_size=300, shard_size=300,
            progress=False, add_tokens=MODES)
    tok = load_tokenizer(str(root / "span"))
    return {"span": str(root / "span"), "tok": tok}


def _spec(corpus, **kw):
    tok = corpus["tok"]
    base = dict(num_streams=4, shuffle_block=64, seed=5, global_batch=8, max_src_len=64, max_tgt_len=64,
                bucket_window=0, sentinel_ids=sentinel_ids(tok), ul2=TABLE, ul2_modes=mode_ids(TABLE, tok.token_to_id))
    base.update(kw)
    return stream_spec(shards=resolve_shards(corpus["span"]), objective="ul2", **base)


def _check(ex, row, d, plan, sentinels, modes):
    """-> (noise tokens, spans, raw length) after checking that the example rebuilds its row."""
    src, tgt = [int(t) for t in ex["src"]], [int(t) for t in ex["tgt"]]
    assert src[0] == modes[d] and src[-1] == 1 and tgt[-1] == 1
    src = src[1:-1]
    if plan.table[d].kind == "prefix":
        suffix = tgt[:-1]
        assert row[len(row) - len(suffix):] == suffix and row[:len(row) - len(suffix)][-len(src):] == src
        assert len(src) == min(len(row) - len(suffix), plan.src_room[d] - 1)
        return len(suffix), 1, len(row)
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = spans.setdefault(t, [])
        else:
            cur.append(t)
    rebuilt = [x for t in src for x in (spans[t] if t in spans else [t])]
    assert rebuilt == row
    assert list(spans) == sentinels[:len(spans)]                # sentinels in order, from the tokenizer
    return sum(map(len, spans.values())), len(spans), len(row)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_denoiser_statistics_match_the_table_and_examples_reassemble(corpus, pack):
    spec = _spec(corpus, pack=pack)
    plan, sentinels = spec.objectives["ul2"].plan, spec.sentinels
    modes = plan.modes
    layout = Layout(spec)
    stats = defaultdict(lambda: [0, 0, 0, 0])                   # noise, spans, tokens, examples
    n = 3000                                                    # across epochs when an epoch is shorter
    for g0 in range(0, n, 64):
        gs = list(range(g0, min(n, g0 + 64)))
        for g, ex in zip(gs, layout.examples(gs)):
            c, v, e, i = layout.locate(g)
            item = layout.reader(c, v).item(e, i)
            d = ex["denoiser"]
            if pack:
                assert d == item[2] and len(item[1]) == plan.raw[d]
            row = [int(t) for t in item[1][:plan.raw[d]]]
            for k, x in enumerate(_check(ex, row, d, plan, sentinels, modes)):
                stats[d][k] += x
            stats[d][3] += 1
            assert len(ex["src"]) <= spec.max_src_len and len(ex["tgt"]) <= spec.max_tgt_len
            if pack and plan.table[d].kind == "span":
                assert len(ex["src"]) >= spec.max_src_len - 2   # packed rows fill the input
    total = sum(s[3] for s in stats.values())
    assert total >= 2000
    for d, den in enumerate(TABLE):
        noise, spans, tokens, count = stats[d]
        assert count / total == pytest.approx(plan.p[d], abs=0.04), den
        assert noise / tokens == pytest.approx(den.noise_density, rel=0.1), den
        if den.kind == "span":
            assert noise / spans == pytest.approx(den.mean_span_length, rel=0.15), den


def test_ul2_resumes_exactly_from_dp2_to_dp1(corpus):
    spec = _spec(corpus, global_batch=8)
    S, k = 14, 6
    ref, _, _ = run(spec, dp=2, steps=S)
    head, _, state = run(spec, dp=2, steps=k)
    tail, _, _ = run(spec, dp=1, steps=S - k, state=state, workers=1)
    assert head + tail == ref


def test_bad_tables_are_refused(corpus):
    from launcher.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"data.ul2\[0\].kind"):
        load_config(None, ["data.objective=ul2", "data.ul2=[{kind: mask}]"])
    with pytest.raises(DataError, match=r"data.ul2\[1\].*max_tgt_len"):
        _spec(corpus, ul2=[Denoiser(mode=""), Denoiser("X", "span", 3.0, 0.5, "")], ul2_modes=[], max_tgt_len=24)
    with pytest.raises(DataError, match=r"data.ul2\[0\].mode"):
        mode_ids([Denoiser(mode="[NOPE]")], corpus["tok"].token_to_id)
