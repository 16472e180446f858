"""The demo path end to end at a smaller scale: corpus -> shards -> 2 ranks ZeRO-2 -> HF -> generate()."""
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launcher.demo", "--work", str(tmp_path), "--heldout", "60",
                        "train.steps=250", "train.log_every=50", "optim.warmup_steps=50"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"exact-match greedy=([\d.]+) beam=([\d.]+) n=(\d+)", last)
    assert m, last
    greedy, beam, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
    assert n == 60
    # 250 steps is a fraction of the demo's training: it must already translate most numbers
    assert greedy >= 0.5 and beam >= 0.5, last
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
