"""ParallelDims: degree validation, model-vs-tp checks, and the real process groups at world 4, tp 2."""
import pytest
import torch
import torch.distributed as dist

from launcher.config import ConfigError
from launcher.parallel import ParallelDims, check_model_for_tp, parallelize
from model.transformer import Transformer, TransformerConfig as ModelConfig
from parallel_utils import spawn


def test_degree_errors_name_every_factor():
    with pytest.raises(ConfigError) as e:
        ParallelDims(tp=2, dp=3, world_size=8)
    assert "tp=2" in str(e.value) and "dp=3" in str(e.value) and "world_size=8" in str(e.value)
    with pytest.raises(ConfigError, match=r"world_size=6 is not a multiple of tp=4"):
        ParallelDims.from_world(tp=4, world_size=6)
    with pytest.raises(ConfigError, match=r"tp=4 does not divide the 2 ranks per node"):
        ParallelDims(tp=4, dp=2, world_size=8, ranks_per_node=2)
    with pytest.raises(ConfigError, match=r"'tp' must be an integer >= 1"):
        ParallelDims(tp=0, dp=4, world_size=0)
    assert ParallelDims.from_world(tp=2, world_size=8).dp == 4


def test_layout_lists():
    d = ParallelDims(tp=2, dp=4, world_size=8)
    assert d.tp_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.dp_group_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ParallelDims(tp=4, dp=1, world_size=4).dp_group_ranks() == [[0], [1], [2], [3]]


def test_model_checks_name_key_and_factors():
    c = ModelConfig(vocab_size=128, d_model=48, n_heads=6, d_ff=96)
    with pytest.raises(ConfigError, match=r"'model.n_heads': 6 heads do not split over parallel.tp=4"):
        check_model_for_tp(c, 4)
    with pytest.raises(ConfigError, match=r"'model.d_ff': 100 does not split over parallel.tp=3"):
        check_model_for_tp(ModelConfig(vocab_size=129, d_model=48, n_heads=6, d_ff=100), 3)
    with pytest.raises(ConfigError, match=r"'model.vocab_size': padded vocabulary 130 does not split over "
                                          r"parallel.tp=3"):
        check_model_for_tp(ModelConfig(vocab_size=130, d_model=48, n_heads=6, d_ff=96), 3)
    check_model_for_tp(c, 2)


def test_tp1_issues_no_collective():
    # No process group exists in this process: any collective (TP or otherwise) would raise.
    assert not dist.is_initialized()
    mesh = ParallelDims(tp=1, dp=1, world_size=1).build(0)
    assert mesh.tp_group is None and mesh.deepspeed_mpu() is None
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                    dropout=0.0)
    model = Transformer(c)
    embed = model.embed
    parallelize(model, mesh, activation_checkpointing=True)
    assert model.embed is embed                       # nothing swapped
    src = torch.randint(2, 64, (2, 5))
    loss, n = model(src, torch.ones(2, 5, dtype=torch.bool), src, src)
    loss.backward()
    assert n == 10 and model.embed.weight.grad is not None


def _groups_worker(rank, world):
    mesh = ParallelDims(tp=2, dp=2, world_size=4).build(rank)
    want_tp = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}[rank]
    want_dp = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}[rank]
    assert list(mesh.tp_ranks) == want_tp and list(mesh.dp_ranks) == want_dp, (rank, mesh)
    assert dist.get_process_group_ranks(mesh.tp_group) == want_tp
    assert dist.get_process_group_ranks(mesh.dp_group) == want_dp
    assert (mesh.tp_rank, mesh.dp_rank) == (rank % 2, rank // 2)
    # the groups really connect those ranks: sum of (rank + 1) over each group
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=mesh.tp_group)
    assert t.item() == sum(r + 1 for r in want_tp), (rank, t)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=mesh.dp_group)
    assert t.item() == sum(r + 1 for r in want_dp), (rank, t)
    mpu = mesh.deepspeed_mpu()
    assert mpu.get_model_parallel_world_size() == 2 and mpu.get_data_parallel_world_size() == 2
    assert mpu.get_model_parallel_rank() == mpu.get_tensor_model_parallel_rank() == rank % 2
    assert mpu.get_data_parallel_rank() == rank // 2
    assert mpu.get_model_parallel_group() is mesh.tp_group and mpu.get_data_parallel_group() is mesh.dp_group
    assert mpu.get_data_parallel_group_ranks() == want_dp and mpu.get_tensor_model_parallel_src_rank() == want_tp[0]


def test_groups_world4_tp2():
    spawn(_groups_worker, 4)


@pytest.mark.parametrize("ranks,gpus,ok", [(2, 1, False), (8, 4, False), (2, 0, True), (4, 4, True), (1, 1, True),
                                           (2, 8, True)])
def test_ranks_per_node_fit_its_gpus(ranks, gpus, ok):
    from launcher.parallel.dims import check_local_gpus
    if ok:
        check_local_gpus(ranks, gpus)                  # no GPU at all: CPU ranks (gloo), any number
    else:
        with pytest.raises(ConfigError, match=rf"--nproc {ranks} needs {ranks} GPUs on this node \(one per rank\), "
                                              rf"but {gpus} (is|are) visible \(CUDA_VISIBLE_DEVICES=0\)"):
            check_local_gpus(ranks, gpus, "0", f"--nproc {ranks}")


def test_more_ranks_than_gpus_are_refused_before_any_process(tiny_pairs, tmp_path, monkeypatch, capsys):
    """`encdec train --nproc 2` and a torchrun rank (LOCAL_WORLD_SIZE=2) on a node that shows one
    GPU: one line, no rank started, no process group, no run folder (the GPU count is the node's)."""
    import subprocess
    from launcher.cli import main
    from launcher.dist_env import DistEnv
    from launcher.train import start
    from ckpt_helpers import make_cfg
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a rank was started"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    run = tmp_path / "run"
    assert main(["train", "configs/test-tiny.yaml", f"data.train={tiny_pairs['train']}", f"out_dir={run}",
                 "--nproc", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "encdec: error: --nproc 2 needs 2 GPUs on this node (one per rank), but 1 is visible "
        "(CUDA_VISIBLE_DEVICES=3); use 1 rank per node, or CUDA_VISIBLE_DEVICES= to train on CPU")
    env = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2, node_rank=0, master_addr="127.0.0.1",
                  master_port=1, launcher="torchrun")
    with pytest.raises(ConfigError, match=r"^LOCAL_WORLD_SIZE=2 \(torchrun\) needs 2 GPUs"):
        start(make_cfg(tiny_pairs["train"], str(run)), env)
    assert not dist.is_initialized() and not run.exists()
