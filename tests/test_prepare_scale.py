"""`encdec prepare` at scale: --workers and a Slurm array job give what one process gives; bad
lines are skipped and counted, or stop the run past --max-bad-lines with nothing left behind;
a rerun redoes only missing units; the tokenizer sample is bounded."""
import json
import os
import random
import re
import subprocess

import pytest

from data.prepare import merge, prepare, run_slice
from data.prepare_plan import cut_units, sample_texts, work_dir
from data.tar import iter_samples
from tests.conftest import run_cli
from tests.slurm_helpers import CPU_ARGS, ROOT, read_text, wait_job

WORDS = "the of and to in is was for on that with as by at from his her an which or be are this had".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 JSONL files (200 documents each, grouped lengths), 3 bad lines among them."""
    root = tmp_path_factory.mktemp("corpus")
    rnd = random.Random(0)
    files = []
    for f in range(4):
        lines = [json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3 + 20 * f, 40 + 20 * f)))})
                 for _ in range(200)]
        if f == 1:
            lines[10] = "{not json"
            lines[50] = json.dumps({"text": ""})
        p = root / f"c{f}.jsonl"
        p.write_bytes("\n".join(lines).encode() + (b"\n{\"text\": \"caf\xe9\"}\n" if f == 2 else b"\n"))
        files.append(str(p))
    return files


def docs(folder):
    """Every sample of a prepared folder in manifest order: (key, ids)."""
    with open(os.path.join(folder, "manifest.json")) as f:
        man = json.load(f)
    return [(k, json.loads(raw["json"])["ids"]) for s in man["shards"]
            for k, raw in iter_samples(os.path.join(folder, s["name"]))]


def files_of(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n != "manifest.json"}


def manifest_of(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        man = json.load(f)
    man.pop("created")
    return man


UNIT = 30000                     # files grouped (the small ones) and cut into pieces (the big ones)
KW = dict(objective="span", vocab_size=300, shard_size=64, unit_bytes=UNIT, progress=False)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "out")
    prepare(corpus, out, **KW)
    return out


def test_bad_lines_counted_per_file(one_process, corpus):
    man = manifest_of(one_process)
    assert man["bad_lines"] == {corpus[1]: 2, corpus[2]: 1} and man["num_bad_lines"] == 3
    assert man["num_samples"] == 800 - 2 and all("index" in s for s in man["shards"])
    assert len(docs(one_process)) == 798


def test_workers_give_the_one_process_output(one_process, corpus, tmp_path):
    out = str(tmp_path / "w2")
    prepare(corpus, out, workers=2, **KW)
    assert manifest_of(out) == manifest_of(one_process)
    assert files_of(out) == files_of(one_process)            # shards, indexes, tokenizer: byte for byte
    assert docs(out) == docs(one_process)


def test_over_the_bad_line_limit_fails_with_nothing_left(corpus, tmp_path):
    r = run_cli(["prepare", *corpus, "--out", str(tmp_path / "o"), "--vocab-size", "300", "--max-bad-lines", "2",
                 "--unit-size", str(UNIT), "--quiet"])
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and "--max-bad-lines=2" in err[0] and "c1.jsonl:11" in err[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_rerun_redoes_only_missing_units(one_process, corpus, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(["prepare", *corpus, "--out", out, "--vocab-size", "300", "--shard-size", "64",
                    "--unit-size", str(UNIT), "--plan-only", "--tokenizer", one_process]).returncode == 0
    n = len(cut_units(corpus, UNIT))
    assert n >= 5 and run_slice(work_dir(out), 0, 2) + run_slice(work_dir(out), 1, 2) == n
    unit = os.path.join(work_dir(out), "unit-00002")
    os.rename(os.path.join(unit, "unit.json"), os.path.join(unit, "x"))  # as if task 0 had died before the end
    assert run_slice(work_dir(out), 1, 2) == 0 and run_slice(work_dir(out), 0, 2) == 1
    merge(out)
    assert docs(out) == docs(one_process) and not os.path.exists(work_dir(out))


def test_tokenizer_sample_is_bounded_and_seeded(corpus):
    full = sum(len(t) for t in sample_texts(corpus, "span", ("text", "src", "tgt"), 1 << 30, 0))
    a = sample_texts(corpus, "span", ("text", "src", "tgt"), 20000, 0)
    assert a == sample_texts(corpus, "span", ("text", "src", "tgt"), 20000, 0)
    assert 0 < sum(len(t) for t in a) < 0.5 * full


@pytest.mark.slurm
def test_array_job_gives_the_one_process_output(slurm_cluster, one_process, corpus, tmp_path):
    out = str(tmp_path / "arr")
    assert run_cli(["prepare", *corpus, "--out", out, "--vocab-size", "300", "--shard-size", "64",
                    "--unit-size", str(UNIT), "--plan-only"]).returncode == 0
    env = {**os.environ, "ENCDEC_HOME": ROOT, "ENCDEC_PREPARE_OUT": out, "ENCDEC_PYTHON": _python()}
    script = os.path.join(ROOT, "slurm", "prepare.sbatch")

    def submit(*args):
        r = subprocess.run(["sbatch", "--parsable", *CPU_ARGS, f"--output={tmp_path}/%A_%a.out", *args, script,
                            *([] if "--array=0-1" in args else ["--merge"])], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    job = submit("--array=0-1")
    for task in ("0", "1"):
        info = wait_job(f"{job}_{task}", 180)
        assert info["JobState"] == "COMPLETED", read_text(f"{tmp_path}/{job}_{task}.out")
    assert sorted(os.listdir(work_dir(out))) == ["plan.json", "tokenizer.json"] + \
        [f"unit-{u:05d}" for u in range(len(cut_units(corpus, UNIT)))]
    info = wait_job(submit(), 180)
    assert info["JobState"] == "COMPLETED", os.listdir(tmp_path)
    assert manifest_of(out) == manifest_of(one_process) and files_of(out) == files_of(one_process)


def _python():
    import sys
    return sys.executable


@pytest.fixture(scope="module")
def slurm_cluster():
    from tests.slurm_helpers import SharedCluster, cannot_run_reason
    reason = cannot_run_reason()
    if reason:
        pytest.skip(reason)
    cluster = SharedCluster()
    cluster.start()
    yield cluster
    cluster.release()


def test_a_big_file_is_cut_into_pieces(corpus, tmp_path):
    """One plain file larger than the unit size is cut into byte pieces at line starts: the same
    documents in the same order, the same bad lines (counted and placed at their file:line)."""
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"".join(open(p, "rb").read() for p in corpus))
    whole = str(tmp_path / "whole")
    prepare([str(big)], whole, **dict(KW, unit_bytes=1 << 30))
    ref = [ids for _, ids in docs(whole)]
    for unit in (1500, 4096, 20011):
        assert len(cut_units([str(big)], unit)) == -(-os.path.getsize(big) // unit)
        out = str(tmp_path / f"cut{unit}")
        r = run_cli(["prepare", str(big), "--out", out, "--tokenizer", whole, "--shard-size", "64",
                     "--unit-size", str(unit), "--workers", "2" if unit == 4096 else "1"])
        assert r.returncode == 0, r.stderr
        assert [ids for _, ids in docs(out)] == ref
        assert manifest_of(out)["bad_lines"] == manifest_of(whole)["bad_lines"] == {str(big): 3}
        assert sorted(re.findall(r"big\.jsonl:(\d+): ", r.stdout)) == ["211", "251", "601"]
