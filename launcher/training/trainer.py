"""The training loop: a DeepSpeed engine over the Transformer, fed by the data stream.

Batch arithmetic, per optimizer step:
    global_batch_size = micro_batch_size x accum x dp          (samples)
    loss = sum of token losses over the whole global batch / number of target tokens in it
Every rank fetches its `accum` micro-batches first and the token count is summed over the
data-parallel group, so each micro-batch's backward carries exactly its share of that loss:
the result equals one process on the same global batch, whatever dp and accum are.

The trainer owns named stateful parts, which checkpoints save and restore (launcher/checkpoint/):
    engine     DeepSpeed engine: model, optimizer (ZeRO-partitioned), gradients
    scheduler  the LR schedule
    stream     the data stream (its position: {"epoch", "cursor"})
    state      TrainState: step, tokens seen
Building a Trainer never resumes: the training entry (launcher/train.py) calls resume() once.
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

from launcher.checkpoint.manager import CheckpointManager
from launcher.checkpoint.rng import seed_all
from launcher.config import RunConfig, save_config
from launcher.dist_env import DistEnv
from launcher.monitor import flops
from launcher.monitor.metrics import Monitor
from launcher.parallel.dims import ParallelDims
from launcher.parallel.tp import clip_grad_norm_tp
from launcher.signals import StopSignal
from launcher.training.engine import all_reduce, autocast, build_engine, init_distributed, to_device
from launcher.training.evaluate import evaluate
from launcher.training.guard import StepGuard
from launcher.training.inputs import Inputs
from launcher.training.runlock import RunBusy, RunLock
from launcher.training.watchdog import Watchdog
from model import count_parameters

STOP_FILE = "requeue_requested"     # written when a signal stopped the run; the sbatch script requeues


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
                 stop: StopSignal | None = None):
        self.cfg, self.env, self.inputs = cfg, env, inputs
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
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))    # complete: vocabulary filled in
            stale = os.path.join(cfg.out_dir, STOP_FILE)
            if os.path.exists(stale):
                os.remove(stale)

        torch.manual_seed(cfg.train.seed)
        self.engine, self.scheduler = build_engine(cfg, self.mesh, self.device, self.accum)
        self.stream = inputs.stream(cfg, "train", self.dp_rank, self.dp, reduce=self._dp_sum)
        t = cfg.train
        self.state = TrainState(guard=StepGuard(t.max_bad_steps, t.spike_z, t.spike_window))
        self.checkpoints = CheckpointManager(cfg, env, self.mesh, inputs.tokenizer_path)
        self.monitor = Monitor(cfg, cfg.out_dir, self.is_rank0, extra_config={
            "world_size": env.world_size, "dp": self.dp, "tp": cfg.parallel.tp, "accum": self.accum,
            "n_params": count_parameters(cfg.model)})
        self.peak_flops = flops.peak_flops(self.device, cfg.train.precision)
        self.stop = stop or StopSignal().install()
        self._grad_norm = 0.0
        self.watchdog = Watchdog(cfg.train.hang_timeout_s, env.rank, env.world_size).start()

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
        group read the same data and are not summed)."""
        return all_reduce(torch.tensor(values, dtype=torch.float64), self.device, self.dp_group).tolist()

    def data_totals(self) -> dict:
        """Collective: bad samples and packing stats summed over the data-parallel ranks."""
        return self.stream.counters()

    def save_checkpoint(self) -> str:
        self.watchdog.beat(self.step, "checkpoint")
        return self.checkpoints.save(**self.stateful())

    # ------------------------------------------------------------------ one step
    def _stop_agreed(self) -> bool:
        """All ranks agree to stop at the same step if any rank got SIGUSR1/SIGTERM."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        return bool(all_reduce(flag, self.device, op=dist.ReduceOp.MAX).item() > 0)

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step over `accum` micro-batches; returns the global mean loss and counts.

        Before the last micro-batch's backward, every rank knows the step's global loss and the
        guard decides (the same on every rank) whether to skip it (launcher/training/guard.py). A
        skipped step leaves parameters, optimizer state and LR schedule as they were: with ZeRO,
        the last backward carries NaN so DeepSpeed's own overflow check (a non-finite global
        gradient norm, computed and all-reduced inside engine.step) drops the gradients and skips
        the optimizer and scheduler; without ZeRO, the gradients are dropped here and the
        scheduler restored. A non-finite gradient norm with a finite loss is skipped the same way.
        """
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        local_src = sum(int(b["src_mask"].sum()) for b in batches)
        local_flops = sum(flops.train_flops(self.cfg.model, b["src"].shape[0], b["src"].shape[1], b["tgt_in"].shape[1],
                                            recompute=False) for b in batches)
        counts = all_reduce(torch.tensor([local_tokens, local_src, local_flops], dtype=torch.float64),
                            self.device, self.dp_group)
        n_tgt = counts[0].item()
        scale = self.dp * self.accum / max(n_tgt, 1.0)
        zero = self.cfg.parallel.zero_stage
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)   # no host sync per micro-batch
        why, loss_value = "", float("nan")
        self.watchdog.beat(self.state.step, "forward/backward")
        for i, b in enumerate(batches):
            # no padding (packed span data): no attention mask, decided on the host copy, no device sync
            unpadded = bool(b["src_mask"].all())
            b = to_device(b, self.device)
            # data.pack_attention: document ids of packed examples, for the per-document encoder mask
            segments = {"src_segments": b["src_segments"]} if "src_segments" in b else {}
            with autocast(self.device, self.cfg.train.precision):
                loss, _ = self.engine(b["src"], None if unpadded else b["src_mask"], b["tgt_in"], b["labels"],
                                      **segments)
            loss = _maybe_poison(loss, self.state.step, self.env.rank, i)
            loss_sum += loss.detach().double()
            factor = scale
            if i == len(batches) - 1:                 # the step's global loss, and the guard's verdict
                loss_value = all_reduce(loss_sum.clone(), self.device, self.dp_group).item() / max(n_tgt, 1.0)
                why = self.state.guard.judge(loss_value)
                if self._any_rank(bool(why)) and not why:
                    why = "another rank's loss is not finite"
                if why and zero:
                    factor = float("nan")              # DeepSpeed sees a non-finite norm and skips
            self.engine.backward(loss * factor)
            if i == len(batches) - 1 and zero == 0:
                # Without ZeRO, DeepSpeed clips but does not report the norm: clip here (TP-aware:
                # each sharded gradient summed over the TP group, replicated ones counted once).
                max_norm = self.cfg.optim.grad_clip or float("inf")
                self._grad_norm = float(clip_grad_norm_tp(self.engine.module.parameters(), max_norm,
                                                          self.mesh.tp_group))
                why = why or self.state.guard.judge(loss_value, self._grad_norm)
                if why:
                    self._skip_without_zero()
                    continue
            if i == len(batches) - 1:
                self.watchdog.beat(self.state.step, "optimizer")
            self.engine.step()
        if zero and self.engine.optimizer.overflow and not why:
            why = "grad_norm is not finite"
        elif zero and why and not self.engine.optimizer.overflow:
            raise RuntimeError("DeepSpeed applied a step the guard skipped (its overflow check did not fire)")
        return {"loss": loss_value, "tgt_tokens": n_tgt, "src_tokens": counts[1].item(),
                "flops": counts[2].item(), "pad_frac": sum(b["pad_frac"] for b in batches) / len(batches),
                "skip": why}

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        return bool(all_reduce(t, self.device, op=dist.ReduceOp.MAX).item() > 0)

    def _skip_without_zero(self) -> None:
        """ZeRO 0: engine.step() with no gradients (the optimizer leaves every parameter and moment
        alone), then the LR schedule put back (DeepSpeed steps it regardless)."""
        for p in self.engine.module.parameters():
            p.grad = None
        saved = self.scheduler.state_dict() if self.scheduler else None
        self.engine.step()
        if saved is not None:
            self.scheduler.load_state_dict(saved)
            for g, lr in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr

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
        t_last, data_wait, n_since, window = time.perf_counter(), 0.0, 0, {}
        while self.state.step < total:
            self.watchdog.beat(self.state.step, "data")
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(self.accum)]
            data_wait += time.perf_counter() - t0
            _maybe_inject_fault(self.state.step, self.env.rank)
            seed_all(step_seed(cfg.train.seed, self.state.step, self.dp_rank))
            stats = self.train_step(batches)
            why = stats.pop("skip")
            self.state.step += 1
            if why:
                self._log_skip(self.step, why, batches)
            self.state.guard.record(self.step, stats["loss"], why)
            self.state.tokens_seen += int(stats["tgt_tokens"] + stats["src_tokens"])
            last = stats
            window = {k: window.get(k, 0.0) + v for k, v in stats.items()}
            n_since += 1
            if self.step % cfg.train.log_every == 0 or self.step == total:
                now = time.perf_counter()
                self._log(window, n_since, now - t_last, data_wait)
                t_last, data_wait, n_since, window = now, 0.0, 0, {}
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and cfg.data.valid:
                self.evaluate()
            stop = self._stop_agreed()
            if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == total:
                self.save_checkpoint()
            if stop:
                if self.is_rank0:
                    open(os.path.join(cfg.out_dir, STOP_FILE), "w").close()
                    what = "requeue requested" if self.stop.name != "SIGINT" else "run the same command to resume"
                    print(f"stopped by signal at step {self.step}; checkpoint saved, {what} "
                          f"({self.stop.name or 'signal on another rank'})", flush=True)
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

    def _log(self, window: dict, n_steps: int, elapsed: float, data_wait: float) -> None:
        """Metrics over the last n_steps steps (sums in `window`, rates over `elapsed` seconds)."""
        tokens = window["tgt_tokens"] + window["src_tokens"]
        step_time = elapsed / max(n_steps, 1)
        world = self.env.world_size
        totals = self.data_totals()
        metrics = {
            "loss": window["loss"] / n_steps, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm(),
            "tokens_per_s": tokens / elapsed, "tokens_per_s_per_device": tokens / elapsed / world,
            "samples_per_s": self.cfg.train.global_batch_size * n_steps / elapsed,
            "step_time_s": step_time, "data_wait_frac": data_wait / elapsed, "tokens_seen": self.state.tokens_seen,
            "mfu": flops.mfu(window["flops"] / n_steps, step_time, self.peak_flops, world),
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


def _maybe_poison(loss: torch.Tensor, step: int, rank: int, micro: int) -> torch.Tensor:
    """Fault injection for the guard's tests: ENCDEC_FAULT_NAN=rank:step makes that rank's first
    micro-batch of that step (0-based, like ENCDEC_FAULT) produce a NaN loss, as a poisoned batch would."""
    spec = os.environ.get("ENCDEC_FAULT_NAN")
    if spec and micro == 0:
        r, s = (int(x) for x in spec.split(":"))
        if r == rank and s == step:
            print(f"ENCDEC_FAULT_NAN: rank {rank} poisons step {step}", flush=True)
            return loss * float("nan")
    return loss


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for the fail-fast tests: ENCDEC_FAULT=rank:step kills that rank there.
    ENCDEC_FAULT_STEP_DELAY=S sleeps S seconds before every step (the chaos soak's pacing: its
    signals must land while training still runs; numerics are unchanged)."""
    delay = os.environ.get("ENCDEC_FAULT_STEP_DELAY")
    if delay:
        time.sleep(float(delay))
    spec = os.environ.get("ENCDEC_FAULT")
    if spec:
        r, s = (int(x) for x in spec.split(":"))
        if r == rank and s == step:
            print(f"ENCDEC_FAULT: rank {rank} exits at step {step}", flush=True)
            os._exit(17)
