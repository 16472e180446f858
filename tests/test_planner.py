"""The planner against DeepSpeed's estimators, and against real steps: peak tensor memory and
the bytes of every collective, measured per rank on 2 CPU ranks (gloo) for several layouts.

Memory is measured with bench/measure.PeakMemory (live tensor storage bytes):
  total        from the trainer engine's construction to the end of its second step (the trainer's
               TrainStep on a build_engine engine), vs the planner's peak (peak_bytes: held states
               + the larger of activations+loss and the step's transient gradients), on 2 ranks and,
               for ZeRO 0-3, on one (where DeepSpeed's partitions are the whole model)
  activations  one forward + backward of the parallelized model above its resting memory
               (weights and gradients allocated), vs activations + loss buffer (+ the fresh weight
               gradients autograd makes before adding them to the existing ones)
Collectives with CollectiveBytes (torch.distributed and DeepSpeed's communication functions
wrapped, bytes per group of 2), over the second step, vs comm_bytes.
"""
import json

import pytest

from conftest import run_cli
from parallel_utils import spawn
from planner_helpers import measure, measure_activations, plan_config

LAYOUTS = [
    ("parallel.zero_stage=0",),
    ("parallel.zero_stage=1",),
    ("parallel.zero_stage=2", "parallel.activation_checkpointing=true"),
    ("parallel.zero_stage=3", "comm.stage3_param_persistence_threshold=1000"),
    ("model.arch=t5", "parallel.zero_stage=1"),           # (tp=1 layouts first: DeepSpeed keeps a tp engine's mpu)
    ("parallel.tp=2", "parallel.zero_stage=0"),
    ("parallel.tp=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true"),
    ("parallel.tp=2", "parallel.zero_stage=3"),
    ("model.arch=t5", "parallel.tp=2", "parallel.zero_stage=0"),
]


def _predict(overrides, world=2):
    from launcher.planner.model import (Layout, activations, comm_bytes, loss_buffer, model_states, param_counts,
                                        peak_bytes)
    cfg = plan_config(overrides, world)
    p = cfg.parallel
    lay = Layout(p.tp, world // p.tp, p.zero_stage, cfg.train.micro_batch_size, p.activation_checkpointing)
    S, T = cfg.data.max_src_len, cfg.data.max_tgt_len
    states = model_states(cfg.model, lay, cfg.comm)
    act = activations(cfg.model, lay, S, T, bf16=False)["activations"] + loss_buffer(cfg.model, lay, T, bf16=False)
    # the activation measurement accumulates into existing gradients: autograd's fresh weight
    # gradients (4 bytes per local parameter) exist next to them until added in
    fresh = 4 * param_counts(cfg.model, p.tp)["local"]
    return {"total": peak_bytes(states, act), "activations": act + fresh,
            "comm": comm_bytes(cfg.model, lay, S, T, bf16=False)["total"]}


def _worker(rank, world, layouts):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rows = []
    for lay in layouts:
        got = measure(rank, world, lay)
        act = measure_activations(rank, world, lay)
        want = _predict(lay, world)
        comm = sum(got["comm"].values())
        rows.append((" ".join(lay), want["total"], got["peak"], want["comm"], comm, want["activations"], act))
        assert abs(want["total"] / got["peak"] - 1) < 0.15, (lay, want, got)
        assert abs(want["comm"] / comm - 1) < 0.05, (lay, want, got)
        assert abs(want["activations"] / act - 1) < 0.15, (lay, want, act)
    if rank == 0:
        for r in rows:
            print("planner vs measured: %-70s total %9d / %9d (%.3f)  comm %9d / %9d (%.4f)  act %9d / %9d (%.3f)"
                  % (r[0], r[1], r[2], r[1] / r[2], r[3], r[4], r[3] / r[4], r[5], r[6], r[5] / r[6]), flush=True)


@pytest.mark.slow
def test_planner_matches_measured_memory_and_collectives():
    spawn(_worker, 2, LAYOUTS)


# one rank, buckets far below the model (as at scale): the model states dominate a micro-batch of 1 x 4/4
ONE_RANK = ("comm.reduce_bucket_size=2000", "comm.stage3_prefetch_bucket_size=2000",
            "comm.stage3_param_persistence_threshold=100")
SMALL = ("train.micro_batch_size=1", "data.max_src_len=4", "data.max_tgt_len=4")


def _one_rank(rank, world):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    for z in (0, 1, 2, 3):
        for batch in (SMALL, ()):
            lay = (f"parallel.zero_stage={z}", *ONE_RANK, *batch)
            got, want = measure(rank, world, lay)["peak"], _predict(lay, world)["total"]
            print(f"planner vs measured, one rank: zero {z} {'1x4/4' if batch else '8x48/24'}: "
                  f"{want:.0f} / {got} ({want / got:.3f})", flush=True)
            assert abs(want / got - 1) < 0.10, (lay, want, got)


@pytest.mark.slow
def test_planner_memory_at_one_rank_zero_0_to_3():
    spawn(_one_rank, 1)


@pytest.mark.parametrize("config", ["configs/1b.yaml", "configs/3b.yaml", "configs/transformer-base.yaml"])
def test_model_states_equal_deepspeed_estimators(config):
    """DeepSpeed's mixed-precision accounting (its estimators) from the planner's parameter counts."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from launcher.config import load_config
    from launcher.planner.model import Layout, model_states, param_counts
    from launcher.planner.plan import _model_for
    cfg = load_config(config, ["parallel.tp=1"])
    c = _model_for(cfg, 1, 32000)
    pc = param_counts(c, 1, 0)
    P = pc["total"]
    for nodes, gpus in ((1, 8), (2, 8), (16, 8)):
        N = nodes * gpus
        _, z2 = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=False)
        _, z3, _ = estimate_zero3_model_states_mem_needs(P, pc["largest_module_local"], gpus, nodes,
                                                         cpu_offload=False, cpu_offload_params=False)
        got = {z: sum(model_states(c, Layout(1, N, z, 1, False), mixed=True).values()) for z in (1, 2, 3)}
        assert got[2] == pytest.approx(z2, abs=2)
        assert got[3] == pytest.approx(z3, abs=2)
        assert got[1] == pytest.approx(z2 + 2 * P * (1 - 1 / N), abs=2)    # ZeRO-1 keeps whole 16-bit grads


@pytest.mark.parametrize("arch", ["transformer", "t5"])
def test_parameter_count_equals_the_model_and_deepspeed(arch):
    from deepspeed.runtime.zero.stage_1_and_2 import model_to_params
    from launcher.planner.model import param_counts
    from model import build, count_parameters
    cfg = plan_config([f"model.arch={arch}"], 1)
    m = build(cfg.model)
    assert param_counts(cfg.model, 1)["total"] == model_to_params(m) == count_parameters(cfg.model)


def test_plan_command_json(tmp_path):
    r = run_cli(["plan", "configs/1b.yaml", "--nodes", "2", "--gpus-per-node", "8", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    for k in ("params", "per_rank_bytes", "comm_bytes_per_step", "flops_per_step", "fits", "layouts"):
        assert k in out, k
    assert set(out["per_rank_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}
    assert 0.95e9 < out["params"] < 1.1e9 and out["fits"] and out["layouts"]
    assert all(x["per_rank_gib"] * 2 ** 30 <= 80 * 2 ** 30 for x in out["layouts"])
    r = run_cli(["plan", "configs/1b.yaml", "--nodes", "1", "--gpus-per-node", "3"])
    assert r.returncode == 2 and r.stderr.startswith("encdec: error: ") and "parallel.tp" in r.stderr


def test_plan_calibrate_times_the_model_on_this_device():
    r = run_cli(["plan", "configs/test-tiny.yaml", "--nodes", "1", "--gpus-per-node", "1", "--calibrate",
                 "--device", "cpu", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    cal = res["calibration"]
    assert cal["device"].startswith("cpu") and cal["micro"] == 4 and cal["precision"] == "fp32"
    assert min(cal["encoder_layer_s"], cal["decoder_layer_s"], cal["rest_s"]) >= 0 and cal["adam_s_per_param"] > 0
    assert res["step_time_s"] > 0
