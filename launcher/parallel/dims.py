"""Parallel degrees, their process groups, and the view of them DeepSpeed asks for.

Layout (world = tp x dp): tensor-parallel groups are runs of consecutive ranks, so with
tp <= GPUs per node a TP group never leaves its node (TP talks every layer); data-parallel
groups are strided across the runs.

    world 8, tp 2:  TP groups [0,1] [2,3] [4,5] [6,7]     DP groups [0,2,4,6] [1,3,5,7]
    rank r:         tp_rank = r % tp                      dp_rank = r // tp

validate_layout() is the one check of a layout, run once per start before any process group;
check_local_gpus() the one check of the ranks of a node against its GPUs (before any process starts).

With tp == 1 no group is created and nothing here issues a collective: the DP group is the
default (world) group and `Mesh.deepspeed_mpu()` returns None, so DeepSpeed runs as plain DP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import ConfigError, RunConfig
from model import ModelConfig


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    dp: int
    world_size: int
    ranks_per_node: int = 0      # 0 = unknown; otherwise TP groups must not cross nodes

    def __post_init__(self):
        for name in ("tp", "dp", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"parallel degree '{name}' must be an integer >= 1, got {v!r}")
        if self.tp * self.dp != self.world_size:
            raise ConfigError(f"parallel degrees do not match the world: tp={self.tp} x dp={self.dp} = "
                              f"{self.tp * self.dp}, but world_size={self.world_size}")
        if self.ranks_per_node and self.ranks_per_node % self.tp:
            raise ConfigError(f"config key 'parallel.tp': tp={self.tp} does not divide the "
                              f"{self.ranks_per_node} ranks per node, so a TP group would span nodes "
                              f"(world_size={self.world_size}, dp={self.dp})")

    @classmethod
    def from_world(cls, tp: int, world_size: int, ranks_per_node: int = 0) -> "ParallelDims":
        if tp < 1 or world_size % tp:
            raise ConfigError(f"config key 'parallel.tp': world_size={world_size} is not a multiple of tp={tp}")
        return cls(tp=tp, dp=world_size // tp, world_size=world_size, ranks_per_node=ranks_per_node)

    def tp_group_ranks(self) -> list[list[int]]:
        return [list(range(k * self.tp, (k + 1) * self.tp)) for k in range(self.dp)]

    def dp_group_ranks(self) -> list[list[int]]:
        return [list(range(j, self.world_size, self.tp)) for j in range(self.tp)]

    def build(self, rank: int) -> "Mesh":
        """Creates the process groups (every rank must call this, in the same order)."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside world_size={self.world_size}")
        tp_ranks = self.tp_group_ranks()[rank // self.tp]
        dp_ranks = self.dp_group_ranks()[rank % self.tp]
        tp_group = dp_group = None
        control = None
        if dist.is_initialized():
            # host-side agreements (stop requests) on CPU tensors: with NCCL a gloo group of every rank
            control = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
        if self.tp > 1:
            if not dist.is_initialized():
                raise RuntimeError("ParallelDims.build: tp > 1 needs torch.distributed to be initialised first")
            if dist.get_world_size() != self.world_size:
                raise ConfigError(f"torch.distributed world size {dist.get_world_size()} != "
                                  f"tp={self.tp} x dp={self.dp} = {self.world_size}")
            # new_group is collective over the whole world: every rank creates every group.
            for ranks in self.tp_group_ranks():
                g = dist.new_group(ranks)
                if rank in ranks:
                    tp_group = g
            for ranks in self.dp_group_ranks():
                g = dist.new_group(ranks)
                if rank in ranks:
                    dp_group = g
        elif dist.is_initialized():
            dp_group = dist.group.WORLD
        return Mesh(dims=self, rank=rank, tp_rank=rank % self.tp, dp_rank=rank // self.tp,
                    tp_ranks=tuple(tp_ranks), dp_ranks=tuple(dp_ranks), tp_group=tp_group, dp_group=dp_group,
                    control_group=control)


@dataclass(frozen=True)
class Mesh:
    """One rank's place in the layout and its groups (tp_group is None when tp == 1)."""
    dims: ParallelDims
    rank: int
    tp_rank: int
    dp_rank: int
    tp_ranks: tuple = ()
    dp_ranks: tuple = ()
    tp_group: Any = None
    dp_group: Any = None
    control_group: Any = None     # every rank, on the host (gloo): agreements that must not wait on a device

    def any_rank(self, flag: bool) -> bool:
        """Collective over every rank, on the host: True if any rank passes True. A CPU tensor through
        gloo, read with numpy: the device's queue is not waited for."""
        if self.control_group is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(t.numpy()[0] > 0)

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp

    def deepspeed_mpu(self) -> "DeepSpeedMPU | None":
        """The `mpu=` argument of deepspeed.initialize: None for tp == 1 (plain data parallelism)."""
        return DeepSpeedMPU(self) if self.tp > 1 else None


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed 0.19 queries (model = tensor parallel here).

    ZeRO reads get_model_parallel_{group,world_size} and the tensor_model_parallel rank for the
    gradient norm (sharded parameters counted on every TP rank, replicated ones on TP rank 0,
    then summed over the model-parallel group); the engine reads the data-parallel group for
    gradient reduction, batch-size arithmetic and the initial parameter broadcast.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    # model parallel == tensor parallel (no pipeline stages)
    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_model_parallel_group(self):
        return self.mesh.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.mesh.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.mesh.dp_ranks)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def check_model_for_tp(m: ModelConfig, tp: int) -> None:
    """Raises ConfigError naming the key when a sharded dimension does not split over tp ranks."""
    if m.n_heads % tp:
        raise ConfigError(f"config key 'model.n_heads': {m.n_heads} heads do not split over parallel.tp={tp} "
                          f"(d_model={m.d_model}, head_dim={m.d_model // max(m.n_heads, 1)})")
    if m.d_ff % tp:
        raise ConfigError(f"config key 'model.d_ff': {m.d_ff} does not split over parallel.tp={tp}")
    if m.vocab_size % tp:
        raise ConfigError(f"config key 'model.vocab_size': padded vocabulary {m.vocab_size} does not split over "
                          f"parallel.tp={tp} (real_vocab_size={m.real_vocab_size}, "
                          f"vocab_multiple={m.vocab_multiple}: make vocab_multiple a multiple of {tp})")


def check_supported(tp: int, zero_stage: int) -> None:
    """Refuses the TP x ZeRO combinations DeepSpeed cannot run. DeepSpeed always runs in fp32 here
    (bf16 is autocast inside its forward, launcher/precision.py), where every stage works with TP:
    proven against a single-process reference in tests/test_tp_deepspeed.py (its own bf16 mode
    is not used: at ZeRO 0 its optimizer drops TP ranks' sharded gradients from the clipping norm)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'parallel.zero_stage': must be 0-3, got {zero_stage}")


def check_local_gpus(ranks_per_node: int, gpus: int, visible: str | None = None, how: str = "") -> None:
    """Refuses more ranks on a node than GPUs it shows (each rank takes cuda:LOCAL_RANK); with no
    GPU at all the ranks run on CPU (gloo), any number. `gpus`: torch.cuda.device_count(), which
    counts only CUDA_VISIBLE_DEVICES (`visible`, named in the message when set); `how`: what asked
    for the ranks (e.g. "--nproc 2")."""
    if gpus <= 0 or ranks_per_node <= gpus:
        return
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    asked = how or f"{ranks_per_node} ranks on this node"
    raise ConfigError(f"{asked} needs {ranks_per_node} GPUs on this node (one per rank), but {gpus} "
                      f"{'is' if gpus == 1 else 'are'} visible{shown}; use {gpus} rank{'s' if gpus > 1 else ''} "
                      "per node, or CUDA_VISIBLE_DEVICES= to train on CPU")


def effective_zero_stage(stage: int, dp: int, keep: bool = False) -> int:
    """The ZeRO stage a layout runs: ZeRO partitions over the data-parallel ranks, so with one of
    them every stage holds the whole model and only adds copies and gradient hooks (measured on an
    H200, one GPU: ZeRO 1 +74% step time and +36% peak memory over ZeRO 0 for configs/1b.yaml,
    +94% time for transformer-base): with dp = 1 the engine runs ZeRO 0, the same optimizer math,
    unless `keep` (parallel.zero_at_one_rank)."""
    return stage if dp > 1 or keep else 0


def validate_layout(cfg: RunConfig, world_size: int, ranks_per_node: int = 0) -> ParallelDims:
    """The one check of the parallel layout, run once per start before any process group waits.

    Degrees (tp divides the world; with ranks_per_node known, a TP group stays inside a node), the
    TP x ZeRO x precision support matrix, the model dimensions TP splits (heads, d_ff, and the
    vocabulary when the config sets it; from a tokenizer it is padded to a multiple of tp,
    training/inputs.py), and the batch arithmetic
    global_batch = micro_batch x accum x dp. Returns the degrees; raises ConfigError naming the key.
    """
    p, t = cfg.parallel, cfg.train
    dims = ParallelDims.from_world(p.tp, world_size, ranks_per_node)
    check_supported(p.tp, p.zero_stage)
    check_model_for_tp(cfg.model, p.tp)
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size': {t.global_batch_size} does not divide into "
            f"micro_batch_size={t.micro_batch_size} x dp={dims.dp} (world {world_size} / tp {p.tp})")
    return dims
