"""train.precision is what the matmuls run in, inside DeepSpeed's engine, at ZeRO 0-3 with TP 2.

On a GPU, DeepSpeed's engine forward switches an outer torch.autocast off unless its config has an
enabled torch_autocast section (deepspeed/runtime/torch_autocast.py: autocast_if_enabled asks
torch.is_autocast_enabled(), which without an argument means CUDA autocast). On the CPU that
question is always False, so the branch never runs here by itself. These tests make it run: the
argument-less torch.is_autocast_enabled() reports the CPU's autocast state, exactly as it reports
the GPU's on a GPU machine. Then:
  - the trainer's step (launcher/training/step.py on a build_engine engine, 2 gloo ranks, tp 2,
    dropout 0.1) runs every matmul and attention of the engine's forward in bf16 at ZeRO 0-3, even
    with an outer autocast around it (what every GPU run did before: it trained in fp32);
  - the control: the same engine without the config's torch_autocast section and an outer autocast
    (the trainer before this fix) runs them in fp32, so the reproduction is faithful;
  - the first step's check stops a run whose matmuls ran in another precision, with one line.
"""
import contextlib
import logging
import os
import subprocess
import sys

import pytest
import torch

from parallel_utils import spawn
from tests.conftest import ROOT

TINY = os.path.join(ROOT, "configs", "test-tiny.yaml")


@contextlib.contextmanager
def cuda_like_autocast_query():
    """torch.is_autocast_enabled() without an argument answers for the CPU, as it does for CUDA on a GPU."""
    orig = torch.is_autocast_enabled

    def query(device_type=None):
        return orig("cpu" if device_type is None else device_type)
    torch.is_autocast_enabled = query
    try:
        yield
    finally:
        torch.is_autocast_enabled = orig


def _step(rank, cfg, mesh):
    from launcher.training.guard import StepGuard
    from launcher.training.inputs import model_config
    from launcher.training.step import TrainStep
    cfg.model = model_config(cfg, 60)
    torch.manual_seed(0)
    return TrainStep(cfg, mesh, "cpu", 1, StepGuard(0), rank=rank)


def _batch(rank):
    g = torch.Generator().manual_seed(7)
    src = torch.randint(3, 60, (2, 9), generator=g)
    tgt = torch.randint(3, 60, (2, 7), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 6:] = False
    return {"src": src, "src_mask": mask, "tgt_in": tgt, "labels": tgt.clone(), "pad_frac": 0.1, "keys": ["a", "b"]}


def _worker(rank, world):
    from launcher.config import load_config
    from launcher.parallel import ParallelDims
    from launcher.precision import MatmulDtypes, PrecisionError
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    mesh = ParallelDims(tp=2, dp=1, world_size=world).build(rank)
    with cuda_like_autocast_query():
        for stage in (0, 1, 2, 3):
            cfg = load_config(TINY, ["train.precision=bf16", f"parallel.zero_stage={stage}", "parallel.tp=2",
                                     "model.dropout=0.1", "model.attention_dropout=0.1"])
            step = _step(rank, cfg, mesh)
            for outer in (False, True):                  # bare, and inside a user's own autocast
                step.checked_precision = False
                with torch.autocast("cpu", dtype=torch.bfloat16) if outer else contextlib.nullcontext():
                    out = step([_batch(rank)], 0)
                seen = step.matmul_dtypes
                assert seen and all(ds == {torch.bfloat16} for ds in seen.values()), (stage, outer, seen)
                assert "mm" in seen or "addmm" in seen, seen
                assert out.loss == out.loss and not out.skip
            # the control: no torch_autocast section, an outer autocast (the trainer before the fix)
            section = step.engine._config.torch_autocast_enabled
            step.engine._config.torch_autocast_enabled = False
            with MatmulDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
                step.engine(*(_batch(rank)[k] for k in ("src", "src_mask", "tgt_in", "labels")))
            assert all(ds == {torch.float32} for ds in rec.seen.values()), rec.seen
            # ... which the first-step check refuses with one line
            step.checked_precision = False
            with pytest.raises(PrecisionError) as e:
                step([_batch(rank)], 1)
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith("train.precision=bf16 but the first step's matmuls ran as "), msg
            assert "float32" in msg
            step.engine._config.torch_autocast_enabled = section
            step.engine.destroy()


@pytest.mark.slow
def test_bf16_matmuls_inside_the_engine_at_every_zero_stage_with_tp(tmp_path):
    spawn(_worker, 2)


_CLI = r"""
import contextlib, sys, torch, deepspeed.runtime.engine as E
@contextlib.contextmanager
def switched_off(engine):            # what DeepSpeed does on a GPU without the torch_autocast section
    with torch.autocast("cpu", enabled=False):
        yield
E.autocast_if_enabled = switched_off
from launcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_first_step_refuses_other_matmul_precision_with_one_line(tiny_pairs, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _CLI, "train", TINY, f"data.train={tiny_pairs['train']}",
                        f"out_dir={out}", "train.precision=bf16", "train.steps=2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("encdec: error: train.precision=bf16 but the first step's matmuls ran as "), last
    assert "float32" in last and "Traceback" not in r.stderr
    assert not (out / "checkpoints").exists()               # stopped before any step was applied


def test_inference_context_leaves_out_cudnn_attention_on_gpus():
    """Evaluation and generation on a GPU: autocast plus SDPA without its cuDNN backend (cuDNN plans
    every new shape, and inference shapes change with each batch and decoding step); training and
    the CPU keep every backend. The flags are the ones SDPA's kernel choice reads on CUDA."""
    import warnings
    from launcher.precision import Precision
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # autocast("cuda") on a machine without CUDA
        with Precision("bf16").inference("cuda:0"):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with Precision("bf16").inference("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
        assert torch.is_autocast_enabled("cpu")
