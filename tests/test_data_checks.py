"""Every dataset a run reads was prepared with the run's tokenizer (refused in one line before any
process starts otherwise), and token ids outside the vocabulary are bad samples, not an index error."""
import json
import os

import pytest

from data.prepare import prepare
from data.tar import iter_samples
from data.stream import DataStream, resolve_shards
from tests.data_helpers import stream_spec
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """span + pairs with tokenizer A, pairs with tokenizer B (another vocabulary size)."""
    root = tmp_path_factory.mktemp("toks")
    (root / "t.txt").write_text("\n".join(f"line {i} " + "word other " * (i % 17) for i in range(120)) + "\n")
    (root / "p.jsonl").write_text("\n".join(json.dumps({"src": f"a {i} b", "tgt": f"c {i} d"}) for i in range(120)))
    prepare([str(root / "t.txt")], str(root / "span_a"), objective="span", vocab_size=400, progress=False)
    prepare([str(root / "p.jsonl")], str(root / "pairs_a"), objective="pairs", tokenizer=str(root / "span_a"),
            progress=False)
    prepare([str(root / "p.jsonl")], str(root / "pairs_b"), objective="pairs", vocab_size=420, progress=False)
    return root


def _config(tmp_path, data: dict) -> str:
    import yaml
    with open(os.path.join(ROOT, "configs", "test-tiny.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["data"].update(data)
    cfg["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _refused(r, *names):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("encdec: error: "), r.stderr
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_mixture_with_another_tokenizer_is_refused(two_tokenizers, tmp_path, nproc):
    r = two_tokenizers
    cfg = _config(tmp_path, {"mixture": [{"source": f"{r}/span_a", "weight": 1, "objective": "span", "name": "t"},
                                         {"source": f"{r}/pairs_b", "weight": 1, "name": "mt"}],
                             "max_src_len": 24, "max_tgt_len": 16})
    _refused(run_cli(["train", cfg, "--nproc", nproc], timeout=120),
             f"{r}/pairs_b/manifest.json", f"{r}/span_a/tokenizer.json")
    assert not (tmp_path / "run").exists()


def test_validation_data_with_another_tokenizer_is_refused(two_tokenizers, tmp_path):
    r = two_tokenizers
    cfg = _config(tmp_path, {"train": f"{r}/pairs_a", "valid": f"{r}/pairs_b",
                             "tokenizer": f"{r}/span_a/tokenizer.json"})
    _refused(run_cli(["train", cfg], timeout=120), f"{r}/pairs_b/manifest.json", f"{r}/span_a/tokenizer.json")


def test_matching_tokenizers_pass_the_check(two_tokenizers):
    from data.resolve import check_data
    from launcher.config import load_config
    r = two_tokenizers
    cfg = load_config(os.path.join(ROOT, "configs", "test-tiny.yaml"),
                      [f"data.train={r}/pairs_a", f"data.valid={r}/pairs_a", f"data.tokenizer={r}/span_a"])
    check_data(cfg.data)


def test_token_ids_outside_the_vocabulary_are_bad_samples(two_tokenizers):
    """pairs_b read with the vocabulary of a smaller tokenizer: samples holding an id >= 380 are
    skipped and counted (placeholders), every batch keeps its ids below the vocabulary."""
    spec = stream_spec(shards=resolve_shards(str(two_tokenizers / "pairs_b")), objective="pairs", num_streams=2,
                      shuffle_block=16, global_batch=8, vocab_size=380, max_bad_samples=1000)
    s = DataStream(spec, 0, 1, micro_batch=8)
    it = iter(s)
    batches = [next(it) for _ in range(10)]
    assert s.skipped > 0 and all(int(b["src"].max()) < 380 and int(b["tgt_in"].max()) < 380 for b in batches)
    assert any(k == "" for b in batches for k in b["keys"])
    recs = [json.loads(raw["json"]) for sh in spec.components[0].shards for _, raw in iter_samples(sh.url)]
    assert sum(max(r["src"] + r["tgt"]) >= 380 for r in recs) > 0
