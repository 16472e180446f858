"""The training loop: a DeepSpeed engine over the Transformer, fed by the data stream.

Batch arithmetic, per optimizer step:
    global_batch_size = micro_batch_size x accum x dp          (samples)
    loss = sum of token losses over the whole global batch / number of target tokens in it
Every rank fetches its `accum` micro-batches first and the token count is summed over the
data-parallel group, so each micro-batch's backward carries exactly its share of that loss:
the result equals one process on the same global batch, whatever dp and accum are.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from datetime import timedelta

import deepspeed
from deepspeed.runtime.utils import clip_grad_norm_
import torch
import torch.distributed as dist

from data.stream import DataStream
from launcher import checkpoint as ckpt
from launcher.build import build_model, build_optimizer, build_stream, ds_config
from launcher.config import RunConfig, save_config, validate_layout
from launcher.dist_env import DistEnv
from launcher import flops
from launcher.monitor import Monitor
from launcher.parallel.plan import parallelize
from launcher.signals import StopSignal
from model.transformer import count_parameters

STOP_FILE = "requeue_requested"     # written when a signal stopped the run; the sbatch script requeues


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


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, stop: StopSignal | None = None):
        self.cfg, self.env = cfg, env
        self.device = init_distributed(env, cfg.train.collective_timeout_s)
        self.dp = validate_layout(cfg, env.world_size)
        self.mesh, self.mpu = build_parallel(cfg, env)
        self.dp_rank = self.mpu.get_data_parallel_rank() if self.mpu else env.rank
        self.dp_group = self.mpu.get_data_parallel_group() if self.mpu else None
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        self.is_rank0 = env.rank == 0
        if not self.is_rank0:                          # the console belongs to rank 0
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
            warnings.filterwarnings("ignore")
        os.makedirs(cfg.out_dir, exist_ok=True)
        if self.is_rank0:
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
            stale = os.path.join(cfg.out_dir, STOP_FILE)
            if os.path.exists(stale):
                os.remove(stale)

        torch.manual_seed(cfg.train.seed)
        model, self.tokenizer_path = build_model(cfg)
        model = parallelize(model, self.mesh, activation_checkpointing=cfg.parallel.activation_checkpointing)
        model.to(self.device)
        if cfg.parallel.zero_stage == 3:
            # the output projection is tied to the embedding and used outside embed's forward
            deepspeed.zero.register_external_parameter(model, model.embed.weight)
        optimizer, scheduler = build_optimizer(cfg, model, self.device)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=self.mpu,
            config=ds_config(cfg, self.accum), dist_init_required=False)
        self.stream: DataStream = build_stream(cfg, cfg.data.train, self.dp_rank, self.dp, shuffle=True)
        self.step, self.tokens_seen = 0, 0
        self.monitor = Monitor(cfg, cfg.out_dir, self.is_rank0, extra_config={
            "world_size": env.world_size, "dp": self.dp, "tp": cfg.parallel.tp, "accum": self.accum,
            "n_params": count_parameters(cfg.model)})
        self.peak_flops = flops.peak_flops(self.device, cfg.train.precision)
        self.stop = stop or StopSignal().install()
        self._grad_norm = 0.0
        ckpt.maybe_resume(self)

    # ------------------------------------------------------------------ helpers
    def _all_reduce(self, t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op, group=group)
        return t

    def _stop_agreed(self) -> bool:
        """All ranks agree to stop at the same step if any rank got SIGUSR1/SIGTERM."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        return bool(self._all_reduce(flag, op=dist.ReduceOp.MAX).item() > 0)

    def _autocast(self):
        dev = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def _to_device(self, b):
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step over `accum` micro-batches; returns the global mean loss and counts."""
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        local_src = sum(int(b["src_mask"].sum()) for b in batches)
        local_flops = sum(flops.train_flops(self.cfg.model, b["src"].shape[0], b["src"].shape[1], b["tgt_in"].shape[1],
                                            recompute=False) for b in batches)
        counts = self._all_reduce(torch.tensor([local_tokens, local_src, local_flops], dtype=torch.float64),
                                  self.dp_group)
        n_tgt = counts[0].item()
        scale = self.dp * self.accum / max(n_tgt, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)   # no host sync per micro-batch
        for i, b in enumerate(batches):
            b = self._to_device(b)
            with self._autocast():
                loss, _ = self.engine(b["src"], b["src_mask"], b["tgt_in"], b["labels"])
            self.engine.backward(loss * scale)
            if i == len(batches) - 1 and self.cfg.parallel.zero_stage == 0:
                # Without ZeRO, DeepSpeed clips but does not report the norm: clip here, with the
                # same TP-aware function (each sharded parameter counted once, replicated ones once).
                max_norm = self.cfg.optim.grad_clip or float("inf")
                self._grad_norm = float(clip_grad_norm_(self.engine.module.parameters(), max_norm, mpu=self.mpu))
            self.engine.step()
            loss_sum += loss.detach().double()
        loss_sum = self._all_reduce(loss_sum, self.dp_group)
        return {"loss": loss_sum.item() / max(n_tgt, 1.0), "tgt_tokens": n_tgt, "src_tokens": counts[1].item(),
                "flops": counts[2].item(), "pad_frac": sum(b["pad_frac"] for b in batches) / len(batches)}

    def train(self) -> dict:
        cfg, total = self.cfg, self.cfg.train.steps
        it = iter(self.stream)
        last = {}
        t_last, data_wait, n_since, window = time.perf_counter(), 0.0, 0, {}
        while self.step < total:
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(self.accum)]
            data_wait += time.perf_counter() - t0
            _maybe_inject_fault(self.step, self.env.rank)
            stats = self.train_step(batches)
            self.step += 1
            self.tokens_seen += int(stats["tgt_tokens"] + stats["src_tokens"])
            last = stats
            window = {k: window.get(k, 0.0) + v for k, v in stats.items()}
            n_since += 1
            if self.step % cfg.train.log_every == 0 or self.step == total:
                now = time.perf_counter()
                self._log(stats, window, n_since, now - t_last, data_wait)
                t_last, data_wait, n_since, window = now, 0.0, 0, {}
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and cfg.data.valid:
                self.evaluate()
            stop = self._stop_agreed()
            if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == total:
                ckpt.save(self)
            if stop:
                if self.is_rank0:
                    open(os.path.join(cfg.out_dir, STOP_FILE), "w").close()
                    print(f"stopped by signal at step {self.step}; checkpoint saved, requeue requested", flush=True)
                break
        if self.step >= total and cfg.data.valid and not cfg.train.eval_every:
            self.evaluate()
        self.monitor.close()
        return {**last, "step": self.step}

    def grad_norm(self) -> float:
        """The global gradient norm of the last step, before clipping."""
        if self.cfg.parallel.zero_stage == 0:
            return self._grad_norm
        return float(self.engine.get_global_grad_norm() or 0.0)

    def _log(self, stats: dict, window: dict, n_steps: int, elapsed: float, data_wait: float) -> None:
        """Metrics over the last n_steps steps (sums in `window`, rates over `elapsed` seconds)."""
        tokens = window["tgt_tokens"] + window["src_tokens"]
        step_time = elapsed / max(n_steps, 1)
        world = self.env.world_size
        metrics = {
            "loss": window["loss"] / n_steps, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm(),
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / world,
            "samples_per_s": self.cfg.train.global_batch_size * n_steps / elapsed,
            "step_time_s": step_time, "data_wait_frac": data_wait / elapsed, "tokens_seen": self.tokens_seen,
            "mfu": flops.mfu(window["flops"] / n_steps, step_time, self.peak_flops, world),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.startswith("cuda") else 0.0,
            "skipped_samples": self.stream.skipped,
            "pad_frac": window["pad_frac"] / n_steps,
            **{f"packing_{k}": v for k, v in self.stream.stats.items()},
        }
        self.monitor.log(self.step, metrics)

    def evaluate(self) -> dict:
        from launcher.eval_loop import evaluate
        return evaluate(self)


def build_parallel(cfg: RunConfig, env: DistEnv):
    """The process mesh (TP groups of consecutive ranks, strided DP groups) and DeepSpeed's mpu
    (None at tp=1, where DeepSpeed's own data-parallel group is the whole world)."""
    from launcher.parallel.dims import ParallelDims
    mesh = ParallelDims.from_world(cfg.parallel.tp, env.world_size).build(env.rank)
    return mesh, mesh.deepspeed_mpu()


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for the fail-fast tests: ENCDEC_FAULT=rank:step kills that rank there."""
    spec = os.environ.get("ENCDEC_FAULT")
    if spec:
        r, s = (int(x) for x in spec.split(":"))
        if r == rank and s == step:
            print(f"ENCDEC_FAULT: rank {rank} exits at step {step}", flush=True)
            os._exit(17)
