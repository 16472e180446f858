"""Bad checkpoints give one clear error naming the problem: another model config, a missing,
truncated or corrupt file, a broken trainer_state.json, another tokenizer, a pickle that would
run code (refused by the weights_only loader). Also: the newest checkpoint.keep are kept.
"""
import json
import os
import shutil

import pytest
import torch
from ckpt_helpers import run_ranks, trainer, train

from common.atomic import file_digest
from tests.conftest import run_cli

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
TAG = "step00000002"


def _restamp(tag_dir, rel):
    """Records a (tampered) file's new size and sha256, so that only the loader itself can object."""
    p = os.path.join(tag_dir, "trainer_state.json")
    with open(p) as f:
        st = json.load(f)
    st["files"][rel] = file_digest(os.path.join(tag_dir, rel))
    with open(p, "w") as f:
        json.dump(st, f)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARK']}",))


def _cases(data, base):
    good = os.path.join(base, "good")
    t = train(data, good, "train.steps=2", "parallel.zero_stage=1", "parallel.zero_at_one_rank=true",
              "checkpoint.every=1", "checkpoint.keep=1")
    kept = sorted(os.listdir(os.path.join(good, "checkpoints")))

    def broken(name, fn):
        run = os.path.join(base, name)
        shutil.copytree(good, run)
        fn(os.path.join(run, "checkpoints", TAG))
        return run

    def flip(d):
        with open(os.path.join(d, OPTIM), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))

    def tokenizer(d):
        p = os.path.join(d, "tokenizer.json")
        with open(p) as f:
            tok = json.load(f)
        tok["added_tokens"][0]["content"] = "<other>"
        with open(p, "w") as f:
            json.dump(tok, f)
        _restamp(d, "tokenizer.json")

    def evil(d):
        torch.save({"optimizer_state_dict": _Evil()}, os.path.join(d, OPTIM))
        _restamp(d, OPTIM)

    runs = {
        "missing": broken("missing", lambda d: os.remove(os.path.join(d, OPTIM))),
        "truncated": broken("truncated", lambda d: os.truncate(os.path.join(d, OPTIM), 100)),
        "flipped": broken("flipped", flip),
        "state": broken("state", lambda d: open(os.path.join(d, "trainer_state.json"), "w").write("{oops")),
        "tokenizer": broken("tokenizer", tokenizer),
        "evil": broken("evil", evil),
    }
    errors = {}
    for name, run in [("model", good), *runs.items()]:
        extra = ["model.d_ff=128"] if name == "model" else []
        try:
            trainer(data, run, "train.steps=3", "parallel.zero_stage=1", *extra)
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - the message is what is tested
            errors[name] = f"{type(e).__name__}: {e}"
    return {"kept": kept, "errors": errors, "runs": runs, "step": t.step}


@pytest.mark.slow
def test_bad_checkpoints_clear_errors(tiny_pairs, tmp_path, monkeypatch):
    mark = tmp_path / "evil-ran"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    res = run_ranks(1, _cases, tiny_pairs["train"], str(tmp_path), tmp=str(tmp_path))
    assert res["kept"] == ["latest", TAG]                        # keep=1: step 1 pruned
    e = res["errors"]
    assert "CheckpointError" in e["model"] and "model.d_ff=64 in the checkpoint, 128 in this run" in e["model"]
    assert f"file {OPTIM} is missing" in e["missing"]
    assert f"{OPTIM} is corrupt: 100 bytes" in e["truncated"]
    assert f"{OPTIM} is corrupt: sha256 differs" in e["flipped"]
    assert "trainer_state.json is corrupt" in e["state"]
    assert "trained with another tokenizer" in e["tokenizer"]
    assert "refusing to load checkpoint file" in e["evil"] and OPTIM in e["evil"] and "system" in e["evil"]
    assert not mark.exists()                                     # the pickled payload never ran
    for msg in e.values():
        assert msg.startswith("CheckpointError"), msg

    # the same through the command line: one line, exit status 2, also for the offline converter
    r = run_cli(["convert", res["runs"]["flipped"], str(tmp_path / "hf")])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("encdec: error: checkpoint file") and "sha256 differs" in r.stderr
    from launcher.checkpoint.format import CheckpointError
    from launcher.hf.export import convert
    with pytest.raises(CheckpointError, match="pickles more than tensors"):
        convert(res["runs"]["evil"], str(tmp_path / "hf2"), progress=False)
    assert not mark.exists()
