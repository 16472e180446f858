"""The whole training step of encdec's trainer vs the stock Hugging Face class, side by side.

    python bench/step.py                                   # d 256, 3+3 layers, 8k vocab, batch 16 x 128/64
    python bench/step.py --precision bf16 --steps 20
    python bench/step.py --config configs/transformer-base.yaml train.micro_batch_size=64
    python bench/step.py --config configs/1b.yaml parallel.tp=1 parallel.zero_stage=1 --skip-hf

One process (one rank), the same model (the stock class is built from our export config and
loaded with our initial weights), the same batches (full-length random token pairs, no padding,
as packed span data), three contenders timed in alternation, one step of each per round (the
order rotates every round, so drift in machine load hits all three alike):

  trainer   the trainer's step (launcher/training/step.py TrainStep, built by the same constructor
            as in the trainer: token count all-reduce, the step guard's one host read, DeepSpeed
            engine forward/backward/step at the configured ZeRO stage, compile and activation
            checkpointing as configured)
  bare      the same encdec model in a plain loop: forward, backward, gradient clipping (as the
            trainer), torch AdamW step, zero_grad
  hf        PegasusForConditionalGeneration (Marian for post-LN) in the same plain loop, labels
            passed to the model (its own mean cross-entropy), AdamW

Printed: step time (median and min over the rounds: on a shared machine the min is the step
least disturbed by other load), tokens/s (source + target tokens), the ratio to hf, the trainer's
overhead over the bare loop (median of the per-round ratios; at --zero 0 the engine drives the
same torch AdamW as the bare loop, so this is the trainer's own cost; at ZeRO 1-3 it adds
DeepSpeed's partitioned optimizer, which buys memory only with more than one data-parallel rank), peak memory, and MFU where the device's peak is known
(launcher/flops.py; ENCDEC_PEAK_FLOPS sets it on any device). Peak memory is measured for
each contender alone, from building it to the end of its first step, as the peak of live tensor
bytes (bench/measure.PeakMemory: every storage an operator creates, counted until it
is freed), on CPU and GPU alike; on GPUs torch.cuda.max_memory_allocated of that phase too.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from launcher.config import ConfigError, load_config  # noqa: E402
from launcher.monitor import flops  # noqa: E402
from launcher.parallel import ParallelDims  # noqa: E402
from bench.measure import PeakMemory  # noqa: E402
from launcher.precision import precision_of  # noqa: E402
from launcher.training.engine import build_optimizer  # noqa: E402
from launcher.training.guard import StepGuard  # noqa: E402
from launcher.training.step import TrainStep  # noqa: E402
from model import arch_of, build, count_parameters, padded_vocab  # noqa: E402

DEFAULT_OVERRIDES = [
    "name=bench-step", "model.d_model=256", "model.n_heads=4", "model.d_ff=1024", "model.n_encoder_layers=3",
    "model.n_decoder_layers=3", "model.max_positions=512", "data.max_src_len=128", "data.max_tgt_len=64",
    "train.micro_batch_size=16", "train.global_batch_size=16", "parallel.zero_stage=1", "parallel.tp=1",
    "train.precision=fp32", "optim.warmup_steps=1000",
]
MIB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.d_model=512")
    p.add_argument("--config", help="YAML config (default: the built-in shape above)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: the config's train.precision")
    p.add_argument("--zero", type=int, help="ZeRO stage of the trainer's engine (default: the config's)")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--skip-hf", action="store_true", help="trainer and bare loop only")
    return p.parse_args(argv)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_batch(cfg, seed: int) -> dict:
    """A host batch as the data stream yields it: full-length token pairs, no padding."""
    g = torch.Generator().manual_seed(seed)
    B, S, T, V = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len, cfg.model.real_vocab_size
    src = torch.randint(3, V, (B, S), generator=g)
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    return {"src": src, "src_mask": torch.ones(B, S, dtype=torch.bool), "tgt_in": tgt[:, :-1].contiguous(),
            "labels": tgt[:, 1:].contiguous(), "pad_frac": 0.0}


class BenchTrainer:
    """The trainer's step (TrainStep, through the constructor the trainer uses), without the data
    stream, monitor and checkpoint machinery the bench does not time."""

    def __init__(self, cfg, device):
        t = cfg.train
        torch.manual_seed(t.seed)
        self.fn = TrainStep(cfg, ParallelDims.from_world(1, 1).build(0), device, 1,
                            StepGuard(t.max_bad_steps, t.spike_z, t.spike_window))
        self.i = 0

    def step(self, b):
        out = self.fn([b], self.i)
        self.i += 1
        return out.loss


class BareLoop:
    """A plain PyTorch loop over a model (ours or the stock class)."""

    def __init__(self, cfg, device, hf: bool):
        self.cfg, self.device, self.hf = cfg, device, hf
        torch.manual_seed(cfg.train.seed)
        ours = build(cfg.model)
        if hf:
            import transformers
            adapter = arch_of(cfg.model).hf
            model = getattr(transformers, adapter.class_name(cfg.model))(adapter.hf_config(cfg.model))
            missing, unexpected = model.load_state_dict(adapter.to_hf_state_dict(ours.state_dict(), cfg.model),
                                                        strict=False)
            assert not unexpected, unexpected
            del ours
        else:
            model = ours
            model.criterion.label_smoothing = cfg.train.label_smoothing
        self.model = model.to(device).train()
        self.opt, _ = build_optimizer(cfg, self.model, device)

    def step(self, b):
        dev = self.device
        b = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
        with precision_of(self.cfg).autocast(dev):
            if self.hf:
                loss = self.model(input_ids=b["src"], attention_mask=b["src_mask"], decoder_input_ids=b["tgt_in"],
                                  labels=b["labels"]).loss
            else:
                s, n = self.model(b["src"], None if bool(b["src_mask"].all()) else b["src_mask"], b["tgt_in"],
                                  b["labels"])
                loss = s / n
        loss.backward()
        if self.cfg.optim.grad_clip:                     # as the trainer (DeepSpeed or its ZeRO-0 clip)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = ([] if args.config else DEFAULT_OVERRIDES) + list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.zero is not None:
        overrides.append(f"parallel.zero_stage={args.zero}")
    try:
        cfg = load_config(args.config, overrides + ["parallel.tp=1"])
    except ConfigError as e:
        print(f"step: {e}", file=sys.stderr)
        return 2
    m = cfg.model
    cfg.model = dataclasses.replace(m, real_vocab_size=args.vocab, vocab_size=padded_vocab(args.vocab, m.vocab_multiple))
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import deepspeed
    on_cuda = torch.cuda.is_available()
    device = "cuda:0" if on_cuda else "cpu"
    if on_cuda:
        torch.cuda.set_device(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False)

    B, S, T = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len
    tokens = B * (S + T)
    print(f"model: d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, d_ff {cfg.model.d_ff}, "
          f"{cfg.model.n_encoder_layers}+{cfg.model.n_decoder_layers} layers, vocab {cfg.model.vocab_size}, "
          f"{count_parameters(cfg.model) / 1e6:.1f}M params; batch {B} x src {S} / tgt {T} = {tokens} tokens")
    where = torch.cuda.get_device_name(0) if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"run: {cfg.train.precision}, trainer ZeRO {cfg.parallel.zero_stage}, compile {cfg.train.compile}, "
          f"activation checkpointing {cfg.parallel.activation_checkpointing}; {where}; "
          f"{args.warmup} warm-up + {args.steps} timed rounds", flush=True)

    batches = [random_batch(cfg, s) for s in range(2)]
    makers = {"trainer": lambda: BenchTrainer(cfg, device), "bare": lambda: BareLoop(cfg, device, hf=False)}
    if not args.skip_hf:
        makers["hf"] = lambda: BareLoop(cfg, device, hf=True)
    runners, peaks, cuda_peaks, first = {}, {}, {}, {}
    for name, make in makers.items():            # each alone: build + first step under the tracker
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakMemory() as pm:
            runners[name] = make()
            out = runners[name].step(batches[0])
            _sync(device)
        first[name] = float(out)
        peaks[name] = pm.peak
        if on_cuda:
            cuda_peaks[name] = torch.cuda.max_memory_allocated() - base
    names = list(runners)
    times = {n: [] for n in names}
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            b = batches[r % 2]
            _sync(device)
            t0 = time.perf_counter()
            runners[n].step(b)
            _sync(device)
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)

    step_flops = flops.train_flops(cfg.model, B, S, T)
    peak = flops.peak_flops(device, cfg.train.precision)
    med = {n: statistics.median(times[n]) for n in names}
    best = {n: min(times[n]) for n in names}
    print("first-step loss: " + ", ".join(f"{n} {first[n]:.4f}" for n in names))
    print()
    head = (f"{'':10s} {'step (s)':>9s} {'min (s)':>8s} {'tokens/s':>10s} {'at min':>8s} {'vs hf':>6s} "
            f"{'peak tensors (MiB)':>19s}")
    head += f" {'peak CUDA (MiB)':>16s}" if on_cuda else ""
    head += f" {'MFU':>6s}"
    print(head)
    for n in names:
        line = (f"{n:10s} {med[n]:9.4f} {best[n]:8.4f} {tokens / med[n]:10,.0f} {tokens / best[n]:8,.0f} "
                f"{(med['hf'] / med[n]) if 'hf' in med else float('nan'):6.2f} {peaks[n] / MIB:19,.1f}")
        if on_cuda:
            line += f" {cuda_peaks[n] / MIB:16,.1f}"
        u = flops.mfu(step_flops, med[n], peak, 1)
        line += f" {('%.1f%%' % (100 * u)) if u is not None else 'n/a':>6s}"
        print(line)
    print()
    if "hf" in med:
        print(f"trainer / hf tokens/s: {med['hf'] / med['trainer']:.3f} (median), {best['hf'] / best['trainer']:.3f} "
              f"(min)   bare / hf: {med['hf'] / med['bare']:.3f} (median), {best['hf'] / best['bare']:.3f} (min)")
    # each round times the two back to back: the median of the per-round ratios cancels slow drift
    # in machine load better than the ratio of the medians
    paired = sorted(t / b for t, b in zip(times["trainer"], times["bare"]))
    q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
    print(f"trainer overhead over the bare loop: {100 * (statistics.median(paired) - 1):+.1f}% (median of "
          f"per-round ratios; quartiles {100 * (q1 - 1):+.1f}% .. {100 * (q3 - 1):+.1f}%), "
          f"{100 * (med['trainer'] / med['bare'] - 1):+.1f}% (ratio of medians), "
          f"{100 * (best['trainer'] / best['bare'] - 1):+.1f}% (ratio of minima)")
    print(f"model FLOPs per step: {step_flops:.3e}; device peak: "
          f"{'%.3g FLOP/s' % peak if peak else 'unknown (set ENCDEC_PEAK_FLOPS for MFU)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
