"""Bad input: one clear `encdec: error:` line naming the problem, and a non-zero exit."""
import pytest

from tests.conftest import run_cli


def _one_error_line(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("encdec: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_corpus(tmp_path):
    _one_error_line(run_cli(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]), "nope.txt")
    assert not (tmp_path / "o").exists()


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    _one_error_line(run_cli(["prepare", str(p), "--out", str(tmp_path / "o")]), "empty corpus", "empty.txt")
    assert not (tmp_path / "o").exists()


def test_non_utf8_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nbad \xff\xfe line\n")
    _one_error_line(run_cli(["prepare", str(p), "--out", str(tmp_path / "o")]), "bad.txt:2", "UTF-8")
    assert not any(x.name.startswith("o") for x in tmp_path.iterdir())


def test_binary_input_is_refused(tmp_path):
    p = tmp_path / "weights.txt"
    p.write_bytes(b"a text-looking first line\n" + bytes(range(256)) * 8)
    _one_error_line(run_cli(["prepare", str(p), "--out", str(tmp_path / "o")]), "weights.txt", "binary data", "NUL")
    assert not any(x.name.startswith("o") for x in tmp_path.iterdir())


def test_invalid_jsonl_field(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"src": "a", "tgt": "b"}\n{"src": "a"}\n')
    _one_error_line(run_cli(["prepare", str(p), "--out", str(tmp_path / "o"), "--objective", "pairs"]),
                    "pairs.jsonl:2", "tgt")


@pytest.mark.parametrize("override, needle", [
    ("model.nheads=4", "model.nheads"),
    ("model.n_heads=5", "model.n_heads"),
    ("train.global_batch_size=10", "train.global_batch_size"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_config(override, needle):
    _one_error_line(run_cli(["train", "configs/test-tiny.yaml", override]), needle)


def test_batch_that_does_not_divide_across_ranks():
    _one_error_line(run_cli(["train", "configs/test-tiny.yaml", "train.global_batch_size=12",
                             "train.micro_batch_size=4", "--nproc", "2"]), "train.global_batch_size", "dp=2")


def test_missing_config_file(tmp_path):
    _one_error_line(run_cli(["train", str(tmp_path / "x.yaml")]), "x.yaml")


def test_missing_checkpoint(tmp_path):
    _one_error_line(run_cli(["convert", str(tmp_path / "no_ckpt"), str(tmp_path / "hf")]), "no_ckpt")
    assert not (tmp_path / "hf").exists()


def test_shard_pattern_that_matches_nothing(tmp_path):
    r = run_cli(["train", "configs/test-tiny.yaml", f"data.train={tmp_path}/none-{{000..003}}.tar", "--nproc", "2"],
                timeout=120)
    _one_error_line(r, "none-")
