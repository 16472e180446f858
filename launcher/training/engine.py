"""Builders shared by the trainer and the benchmarks: process group, model, optimizer, DeepSpeed engine.

    init_distributed(env)     NCCL on GPUs, gloo on CPU; returns the device string
    build_model(cfg)          the model of cfg.model (vocabulary sizes already filled by inputs.py)
    build_optimizer(...)      AdamW (no decay on biases, norms, embeddings) + the LR schedule
    ds_config(cfg, accum)     DeepSpeed's config: fp32 engine (bf16 autocast in its forward), ZeRO stage, comm.*
    build_engine(...)         all of the above + the TP plan -> (engine, scheduler)
"""
from __future__ import annotations

from datetime import timedelta

import deepspeed
from deepspeed.utils import set_z3_leaf_modules
import torch
import torch.distributed as dist

from launcher.config import RunConfig
from launcher.dist_env import DistEnv
from launcher.precision import precision_of
from launcher.parallel.dims import Mesh
from launcher.parallel.plan import parallelize
from launcher.training.schedule import lr_multiplier
from model import build


def init_distributed(env: DistEnv, timeout_s: int) -> str:
    """Process group over all ranks: NCCL on GPUs, gloo on CPU. Returns the device string."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device, backend = f"cuda:{env.local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   rank=env.rank, world_size=env.world_size, auto_mpi_discovery=False)
    return device


def build_model(cfg: RunConfig) -> torch.nn.Module:
    model = build(cfg.model)                          # the architecture of model.arch (model/registry.py)
    model.criterion.label_smoothing = cfg.train.label_smoothing
    return model


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: str):
    """AdamW (no decay on biases, norms, embeddings) and the LR schedule as a LambdaLR."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name and "relative_attention_bias" not in name
         else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, o.schedule, o.warmup_steps, cfg.train.steps, o.min_lr_ratio))
    return opt, sched


def ds_config(cfg: RunConfig, accum: int, n_params: int | None = None) -> dict:
    """DeepSpeed runs in fp32 (master weights, gradients, their reduction); train.precision=bf16 adds
    its torch_autocast section, so the engine runs its forward under bf16 autocast (launcher/precision.py).

    Communication settings from cfg.comm. n_params (this rank's parameter count): buckets are
    capped to it, since a bucket larger than the model only reserves memory (ZeRO 1/2 allocate
    reduce_bucket_size elements whatever the model size).
    """
    c = cfg.comm
    cap = (lambda n: min(n, max(n_params, 1))) if n_params else (lambda n: n)
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage > 0:
        zero.update(overlap_comm=c.overlap_comm, contiguous_gradients=c.contiguous_gradients,
                    reduce_bucket_size=cap(c.reduce_bucket_size))
        if cfg.parallel.zero_stage < 3:
            zero.update(allgather_bucket_size=cap(c.allgather_bucket_size))
        else:
            zero.update(stage3_prefetch_bucket_size=cap(c.stage3_prefetch_bucket_size),
                        stage3_param_persistence_threshold=c.stage3_param_persistence_threshold,
                        stage3_max_live_parameters=c.stage3_max_live_parameters)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # without ZeRO the trainer clips itself (to report the norm); ZeRO optimizers clip here
        "gradient_clipping": cfg.optim.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        # its throughput timer synchronizes the device twice per step (when no dataloader is passed
        # to it); the trainer measures its own throughput
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_allow_untested_optimizer": True,
        **precision_of(cfg).deepspeed_config(),
    }


def compile_scope(cfg: RunConfig, dp: int) -> str:
    """What train.compile compiles (launcher/parallel/plan.py): the whole forward at ZeRO 0 or one
    data-parallel rank; the encoder, decoder and loss apart at ZeRO 1-2 over several ranks; each
    layer at ZeRO 3. ZeRO-3 gathers parameters in hooks around every module, which stay out of
    compiled code only around eager leaf modules. ZeRO 1-2 count and reduce gradients in hooks
    that, over several data-parallel ranks, came out wrong with the whole forward as one graph
    (a different gradient norm from eager's at the first compiled step) and right with the three
    graphs (tests/test_compile.py compares each scope's losses with eager's)."""
    if not cfg.train.compile:
        return ""
    z = cfg.parallel.zero_stage
    if z == 3:
        return "layers"
    return "model" if z == 0 or dp == 1 else "stacks"


def build_engine(cfg: RunConfig, mesh: Mesh, device: str, accum: int):
    """The model with the TP plan applied (train.compile: compiled, compile_scope), on `device`, inside a
    DeepSpeed engine -> (engine, scheduler)."""
    model = parallelize(build_model(cfg), mesh, activation_checkpointing=cfg.parallel.activation_checkpointing,
                        compile=compile_scope(cfg, mesh.dp))
    model.to(device)
    if cfg.parallel.zero_stage == 3:
        # the output projection is tied to the embedding and used outside embed's forward
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
        if compile_scope(cfg, mesh.dp) == "layers":
            # a whole layer's parameters are gathered by its (eager) pre-forward hook: no ZeRO
            # hooks inside the compiled code
            set_z3_leaf_modules(model, [type(model.encoder[0]), type(model.decoder[0])])
    optimizer, scheduler = build_optimizer(cfg, model, device)
    n_local = sum(p.numel() for p in model.parameters())
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mesh.deepspeed_mpu(),
        config=ds_config(cfg, accum, n_params=n_local), dist_init_required=False)
    if mesh.dp == 1 and cfg.parallel.zero_stage == 0:
        # one data-parallel rank: DeepSpeed would still flatten every gradient into a buffer,
        # all-reduce it over a group of one and copy it back after each backward
        engine.enable_backward_allreduce = False
    return engine, scheduler


def host_to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory, asynchronously: a copy from pageable
    memory would make the host wait for the whole stream first (a hidden synchronisation)."""
    if t.device.type == "cpu" and device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(batch: dict, device: str) -> dict:
    return {k: (host_to_device(v, device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def all_reduce(t: torch.Tensor, device: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    t = host_to_device(t, device)
    dist.all_reduce(t, op=op, group=group)
    return t
