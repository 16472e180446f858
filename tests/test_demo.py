"""The demo path end to end at a smaller scale: corpus -> shards -> 2 ranks ZeRO-2 -> HF -> generate();
and the demo's layout on machines with 0 to 8 GPUs."""
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("gpus,ranks", [(0, 2), (1, 1), (2, 2), (3, 2), (8, 8)])
def test_demo_fits_the_machine(gpus, ranks):
    """One rank per GPU (as many as divide the global batch), 2 CPU ranks without one; the layout
    passes the GPU check and the layout check."""
    import os
    from launcher.config import load_config
    from launcher.demo import demo_layout
    from launcher.parallel.dims import check_local_gpus, validate_layout
    config = os.path.join(ROOT, "configs", "demo.yaml")
    t = load_config(config, []).train
    n, overrides = demo_layout(gpus, t.global_batch_size, t.micro_batch_size)
    assert n == ranks
    check_local_gpus(n, gpus)
    assert validate_layout(load_config(config, overrides), n, n).dp == n


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
