"""Shared test fixtures. Multi-process tests use free ports picked at run time, never fixed ones."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Subprocesses (torchrun, python -m launcher.cli) import the same tree.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def port():
    from launcher.dist_env import free_port
    return free_port()


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """A prepared pairs dataset (real tokenizer, real tar shards): {"train", "valid", "heldout_jsonl"}."""
    from data.prepare import prepare
    from data.synthetic import write_corpus
    root = tmp_path_factory.mktemp("tiny_pairs")
    train, held = write_corpus(str(root / "corpus"), n_heldout=64)
    prepare([train], str(root / "train"), objective="pairs", vocab_size=300, shard_size=1500, progress=False)
    prepare([held], str(root / "valid"), objective="pairs", tokenizer=str(root / "train"), progress=False)
    return {"train": str(root / "train"), "valid": str(root / "valid"), "heldout_jsonl": held}


def run_cli(args, timeout=300, env=None):
    """Runs `python -m launcher.cli ARGS` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


def read_metrics(run_dir, kind="train"):
    import json
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]
