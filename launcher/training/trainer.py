"""The training loop: a DeepSpeed engine over the model, fed by the data stream.

Batch arithmetic, per optimizer step (launcher/training/step.py, the step itself):
    global_batch_size = micro_batch_size x accum x dp          (samples)
    loss = sum of token losses over the whole global batch / number of target tokens in it

The trainer owns named stateful parts, which checkpoints save and restore (launcher/checkpoint/):
    engine     DeepSpeed engine: model, optimizer (ZeRO-partitioned), gradients
    scheduler  the LR schedule
    stream     the data stream (its position and counters)
    state      TrainState: step, tokens seen, the step guard's counters
Building a Trainer never resumes: the training entry (launcher/train.py) calls resume() once.
A step reads one value set back from the device (the guard's verdict); token counts and the
other metrics are read on logging steps only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from launcher import run_files
from launcher.checkpoint.manager import CheckpointManager
from launcher.checkpoint.rng import seed_all
from launcher.config import RunConfig, save_config
from launcher.dist_env import DistEnv
from launcher.faults import NONE, Faults
from launcher.monitor import flops
from launcher.monitor.metrics import Monitor
from launcher.parallel.dims import ParallelDims
from launcher.signals import StopSignal
from launcher.training.engine import all_reduce, init_distributed
from launcher.training.evaluate import evaluate
from launcher.training.guard import StepGuard
from launcher.training.inputs import Inputs
from launcher.training.runlock import RunBusy, RunLock
from launcher.training.step import TrainStep
from launcher.training.watchdog import Watchdog
from model import count_parameters


@dataclass
class TrainState:
    """The loop's own counters and the step guard's (saved at the top level of trainer_state.json;
    the data counters are the stream's own state)."""
    step: int = 0
    tokens_seen: int = 0
    guard: StepGuard = field(default_factory=lambda: StepGuard(0))

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, **self.guard.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens_seen = int(d["step"]), int(d.get("tokens_seen", 0))
        self.guard.load_state_dict(d)


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """The seed of every generator of a rank for one step: a function of (seed, step, dp rank) only,
    so the ranks of a TP group draw the same dropout masks, data-parallel ranks different ones, and
    every start path (fresh, resume on any layout, Hugging Face folder) continues alike."""
    h = hashlib.blake2b(f"{seed},{step},{dp_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, dims: ParallelDims, inputs: Inputs,
                 stop: StopSignal | None = None, faults: Faults = NONE):
        self.cfg, self.env, self.inputs, self.faults = cfg, env, inputs, faults
        self.device = init_distributed(env, cfg.train.collective_timeout_s)
        self.mesh = dims.build(env.rank)
        self.dp, self.dp_rank, self.dp_group = dims.dp, self.mesh.dp_rank, self.mesh.dp_group
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        self.is_rank0 = env.rank == 0
        if not self.is_rank0:                          # the console belongs to rank 0
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
            warnings.filterwarnings("ignore")
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.lock = self._lock_run_dir()
        if self.is_rank0:
            save_config(cfg, os.path.join(cfg.out_dir, run_files.CONFIG))    # complete: vocabulary filled in
            stale = os.path.join(cfg.out_dir, run_files.REQUEUE_REQUESTED)
            if os.path.exists(stale):
                os.remove(stale)

        t = cfg.train
        self.state = TrainState(guard=StepGuard(t.max_bad_steps, t.spike_z, t.spike_window))
        self.stop = stop or StopSignal().install()
        self.watchdog = Watchdog(cfg.train.hang_timeout_s, env.rank, env.world_size).start()
        torch.manual_seed(cfg.train.seed)
        self.step_fn = TrainStep(cfg, self.mesh, self.device, self.accum, self.state.guard,
                                 watchdog=self.watchdog, faults=faults, rank=env.rank)
        self.engine, self.scheduler = self.step_fn.engine, self.step_fn.scheduler
        self.stream = inputs.stream(cfg, "train", self.dp_rank, self.dp, reduce=self._dp_sum)
        self.checkpoints = CheckpointManager(cfg, env, self.mesh, inputs.tokenizer_path, faults)
        self.monitor = Monitor(cfg, cfg.out_dir, self.is_rank0, extra_config={
            "world_size": env.world_size, "dp": self.dp, "tp": cfg.parallel.tp, "accum": self.accum,
            "n_params": count_parameters(cfg.model)})
        self.peak_flops = flops.peak_flops(self.device, cfg.train.precision)
        self._pending = torch.zeros(2, dtype=torch.float64, device=self.device)   # tokens not yet in state

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 takes the run folder (launcher/training/runlock.py); every rank hears if it is busy."""
        lock, err = None, None
        if self.is_rank0:
            try:
                lock = RunLock(self.cfg.out_dir).acquire()
                if lock.took_over:
                    print(f"run folder {self.cfg.out_dir}: taking over from a run that is gone "
                          f"({lock.took_over})", flush=True)
            except RunBusy as e:
                err = str(e)
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise RunBusy(box[0])
        return lock

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ checkpoints
    def stateful(self) -> dict:
        """The parts a checkpoint holds, by name."""
        return {"engine": self.engine, "scheduler": self.scheduler, "data": self.stream, "train": self.state}

    def resume(self) -> str | None:
        """Continues from checkpoint.resume (the run's latest, a tag, or a Hugging Face folder), if any."""
        self.watchdog.beat(self.step, "resume")
        out = self.checkpoints.resume(**self.stateful())     # the stream's counters come back with its position
        self.watchdog.beat(self.step, "data")
        return out

    def _dp_sum(self, values: list) -> list:
        """Collective: numbers summed over the data-parallel ranks (each counted once: TP ranks of a
        group read the same data and are not summed); the stream's counters use it."""
        return all_reduce(torch.tensor(values, dtype=torch.float64), self.device, self.dp_group).tolist()

    def _reduce(self, extra: list[float] = (), device_values: list[torch.Tensor] = ()) -> tuple[dict, list, list]:
        """Collective: the stream's counters (bad samples, packing stats) summed over the data-parallel
        ranks as DataStream.counters() sums them, with the sums of `extra` (this rank's numbers), and
        `device_values` read back with them, in one host read. Also moves the device token count into
        state.tokens_seen. -> (data totals, summed extra, device values)."""
        keys = sorted(self.stream.stats)
        host = [float(self.stream.skipped)] + [float(self.stream.stats[k]) for k in keys] + [float(x) for x in extra]
        red = all_reduce(torch.tensor(host, dtype=torch.float64), self.device, self.dp_group)
        flat = torch.cat([red, self._pending, *[v.reshape(-1).to(torch.float64) for v in device_values]]).tolist()
        self._pending.zero_()
        n, m = 1 + len(keys), len(host)
        self.state.tokens_seen += int(flat[m] + flat[m + 1])
        out, at = [], m + 2
        for v in device_values:
            out.append(flat[at:at + v.numel()])
            at += v.numel()
        totals = {"bad_samples": int(flat[0]), "packing": {k: int(v) for k, v in zip(keys, flat[1:n])}}
        return totals, flat[n:m], out

    def save_checkpoint(self) -> str:
        self.watchdog.beat(self.step, "checkpoint")
        tgt, src = self._pending.tolist()               # every token counted so far, in the state saved
        self._pending.zero_()
        self.state.tokens_seen += int(tgt + src)
        return self.checkpoints.save(**self.stateful())

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: list[dict]):
        """One optimizer step (launcher/training/step.py) at the current step index -> StepOut."""
        return self.step_fn(batches, self.state.step)

    def _log_skip(self, step: int, why: str, batches: list[dict]) -> None:
        """One line on rank 0 naming the step, the cause and the sample keys of the global batch."""
        keys = [k for b in batches for k in b["keys"]]
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, keys if self.mesh.tp_rank == 0 else [])
        if self.is_rank0:
            allk = [k for ks in per_rank for k in ks]
            shown = ", ".join(k or "<placeholder>" for k in allk[:32]) + (" ..." if len(allk) > 32 else "")
            print(f"step {step} skipped ({why}); skipped_steps={self.state.guard.skipped + 1}; "
                  f"batch keys ({len(allk)}): {shown}", flush=True)

    def close(self) -> None:
        """After a finished run: the engine and the process group shut down in order (threads of the
        communication backend joined, rather than torn down with the interpreter)."""
        self.engine.destroy()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def train(self) -> dict:
        it = iter(self.stream)
        try:
            return self._loop(it, self.cfg.train.steps)
        finally:
            self.watchdog.close()
            if self.lock:
                self.lock.release()

    def _loop(self, it, total: int) -> dict:
        cfg, last = self.cfg, {}
        t_last, data_wait, n_since = time.perf_counter(), 0.0, 0
        window = {"loss": 0.0, "flops": 0.0, "pad_frac": 0.0}
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)     # global tokens since the last log
        while self.state.step < total:
            self.watchdog.beat(self.state.step, "data")
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(self.accum)]
            data_wait += time.perf_counter() - t0
            self.faults.before_step(self.state.step, self.env.rank)
            seed_all(step_seed(cfg.train.seed, self.state.step, self.dp_rank))
            out = self.train_step(batches)
            self.state.step += 1
            if out.skip:
                self._log_skip(self.step, out.skip, batches)
            self.state.guard.record(self.step, out.loss, out.skip)
            self._pending += out.counts
            counts += out.counts
            for k in window:
                window[k] += getattr(out, k)
            last = {"loss": out.loss, "skip": out.skip}
            n_since += 1
            if self.step % cfg.train.log_every == 0 or self.step == total:
                now = time.perf_counter()
                self._log(window, counts, n_since, now - t_last, data_wait)
                t_last, data_wait, n_since = now, 0.0, 0
                window = dict.fromkeys(window, 0.0)
                counts.zero_()
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and cfg.data.valid:
                self.evaluate()
            stop = self.mesh.any_rank(self.stop.requested)     # all ranks stop at the same step
            if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == total:
                self.save_checkpoint()
            if stop:
                if self.is_rank0:
                    open(os.path.join(cfg.out_dir, run_files.REQUEUE_REQUESTED), "w").close()
                    what = "requeue requested" if self.stop.name != "SIGINT" else "run the same command to resume"
                    print(f"stopped by signal at step {self.step}; checkpoint saved, {what} "
                          f"({self.stop.name or 'signal on another rank'})", flush=True)
                break
        if self.step >= total and cfg.data.valid and not cfg.train.eval_every:
            self.evaluate()
        self.monitor.close()
        return {**last, "step": self.step}

    def _log(self, window: dict, counts: torch.Tensor, n_steps: int, elapsed: float, data_wait: float) -> None:
        """Metrics over the last n_steps steps (sums in `window` and `counts`, rates over `elapsed` seconds),
        read in one host read (Trainer._reduce)."""
        totals, (step_flops,), ((tgt, src), (grad_norm,)) = self._reduce(
            [window["flops"]], [counts, self.step_fn.grad_norm()])
        tokens = tgt + src
        step_time = elapsed / max(n_steps, 1)
        world = self.env.world_size
        metrics = {
            "loss": window["loss"] / n_steps, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / world,
            "samples_per_s": self.cfg.train.global_batch_size * n_steps / elapsed,
            "step_time_s": step_time, "data_wait_frac": data_wait / elapsed, "tokens_seen": self.state.tokens_seen,
            "mfu": flops.mfu(step_flops / n_steps, step_time, self.peak_flops, world),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.startswith("cuda") else 0.0,
            "skipped_samples": totals["bad_samples"], "skipped_steps": self.state.guard.skipped,
            "pad_frac": window["pad_frac"] / n_steps,
            **{f"packing_{k}": v for k, v in totals["packing"].items()},
        }
        self.monitor.log(self.step, metrics)

    def evaluate(self) -> dict:
        """Validation loss/perplexity (and BLEU/chrF of greedy generations for pairs), logged."""
        cfg = self.cfg
        self.watchdog.beat(self.step, "eval")
        stream = self.inputs.stream(cfg, "valid", self.dp_rank, self.dp,
                                    global_batch=cfg.train.micro_batch_size * self.dp)
        res, rows = evaluate(self.engine, stream, cfg, self.mesh, self.device, self.inputs.tokenizer_path,
                             is_rank0=self.is_rank0)
        self.monitor.log_eval(self.step, res, table_rows=rows)
        return res
