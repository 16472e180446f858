"""The whole training step of encdec's trainer vs the stock Hugging Face class, side by side.

    python bench/step.py                                   # d 256, 3+3 layers, 8k vocab, batch 16 x 128/64
    python bench/step.py --precision bf16 --steps 20
    python bench/step.py --config configs/transformer-base.yaml train.micro_batch_size=64
    python bench/step.py --config configs/1b.yaml parallel.tp=1 parallel.zero_stage=1 --skip-hf
    python bench/step.py --config configs/transformer-base.yaml --precision bf16 --zeros 0,1,2,3 --compiled \
        --plan --json base.json          # what bench/gpu_check.py runs

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

--zeros 0,1,2,3 times a trainer per ZeRO stage (trainer-z0, ...); --compiled adds the trainer and
the bare loop with train.compile (trainer+compile, bare+compile); --plan adds the planner's
prediction for each trainer (launcher/planner: peak memory, and the step time calibrated on this
device) beside what was measured; the trainer's first step reports the dtype its matmuls ran in
(launcher/precision.py's check), and its timed steps are counted for host synchronisations
(bench/measure.py HostSyncs; on CUDA also torch's sync debug mode). --json writes all of it.

Printed: step time (median and min over the rounds: on a shared machine the min is the step
least disturbed by other load), tokens/s (source + target tokens), the ratio to hf, the trainer's
overhead over the bare loop (median of the per-round ratios; at --zero 0 the engine drives the
same torch AdamW as the bare loop, so this is the trainer's own cost; at ZeRO 1-3 it adds
DeepSpeed's partitioned optimizer, which buys memory only with more than one data-parallel rank), peak memory, and MFU where the device's peak is known
(launcher/flops.py; ENCDEC_PEAK_FLOPS sets it on any device). Peak memory is measured for
each contender alone, from building it to the end of its second step, as the peak of live tensor
bytes (bench/measure.PeakMemory: every storage an operator creates, counted until it
is freed), on CPU and GPU alike; on GPUs torch.cuda.max_memory_allocated of that phase too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.contenders import BareLoop, BenchTrainer, one_rank, random_batch  # noqa: E402
from bench.measure import HostSyncs, PeakMemory  # noqa: E402
from launcher.training.engine import compile_scope  # noqa: E402
from launcher.config import ConfigError, load_config  # noqa: E402
from launcher.monitor import flops  # noqa: E402
from model import count_parameters, padded_vocab  # noqa: E402

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
    p.add_argument("--zeros", help="comma-separated ZeRO stages: one trainer contender each (trainer-zN)")
    p.add_argument("--compiled", nargs="?", const="all", choices=("all", "trainer"),
                   help="also the trainer (and, with 'all', the bare loop) with train.compile")
    p.add_argument("--plan", action="store_true", help="the planner's memory and (calibrated) step time beside")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--steps", type=int, default=8, help="timed rounds (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--skip-hf", action="store_true", help="trainer and bare loop only")
    p.add_argument("--force-zero", action="store_true",
                   help="run the configured ZeRO stage at one data-parallel rank (the trainer runs ZeRO 0 there)")
    p.add_argument("--forced-zeros", help="comma-separated ZeRO stages run as configured even at one rank "
                                          "(contenders deepspeed-zN: DeepSpeed's own cost there)")
    return p.parse_args(argv)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _with(cfg, **train_or_parallel):
    t = {k: v for k, v in train_or_parallel.items() if k in ("compile",)}
    p = {k: v for k, v in train_or_parallel.items() if k in ("zero_stage",)}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **t),
                               parallel=dataclasses.replace(cfg.parallel, **p))


def contenders(cfg, device, args) -> dict:
    """name -> maker, in the order they are built and timed."""
    zeros = [int(z) for z in args.zeros.split(",")] if args.zeros else [cfg.parallel.zero_stage]
    out = {}
    for z in zeros:
        name = f"trainer-z{z}" if args.zeros else "trainer"
        out[name] = (lambda z=z: BenchTrainer(_with(cfg, zero_stage=z), device, args.force_zero))
    for z in ([int(x) for x in args.forced_zeros.split(",")] if args.forced_zeros else []):
        out[f"deepspeed-z{z}"] = (lambda z=z: BenchTrainer(_with(cfg, zero_stage=z), device, True))
    out["bare"] = lambda: BareLoop(cfg, device, hf=False)
    if args.compiled:
        out[f"{next(iter(out))}+compile"] = lambda: BenchTrainer(_with(cfg, zero_stage=zeros[0], compile=True), device,
                                                                 args.force_zero)
        if args.compiled == "all":
            out["bare+compile"] = lambda: BareLoop(cfg, device, hf=False,
                                                   compile=compile_scope(_with(cfg, zero_stage=0, compile=True), 1))
    if not args.skip_hf:
        out["hf"] = lambda: BareLoop(cfg, device, hf=True)
    return out


def _timed_step(runner, b, device) -> float:
    """One step, timed with the device synchronized around it."""
    _sync(device)
    t0 = time.perf_counter()
    runner.step(b)
    _sync(device)
    return time.perf_counter() - t0


def _counted_step(runner, b, device, syncs) -> tuple[dict, int]:
    """One (untimed: counting costs time) trainer step: its host reads by who asked, and on CUDA the
    synchronizing operations torch's sync debug mode reports."""
    with warnings.catch_warnings(record=True) as w:
        on_cuda = device.startswith("cuda")
        if on_cuda:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        syncs.active = True
        try:
            runner.step(b)
        finally:
            syncs.active = False
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
        _sync(device)
    return syncs.take(), sum("synchroniz" in str(x.message) for x in w)


def _predict(cfg, name, runner, device, cal_cache):
    """The planner's peak memory and step time for this trainer's layout (tp 1, dp 1)."""
    from launcher.planner.calibrate import calibrate
    from launcher.planner.model import Hardware, Layout, estimate
    c = runner.fn.cfg
    if "cal" not in cal_cache:
        cal_cache["cal"] = calibrate(c, c.train.micro_batch_size, device)
    lay = Layout(1, 1, c.parallel.zero_stage, c.train.micro_batch_size, c.parallel.activation_checkpointing)
    hw = Hardware(peak_flops=flops.peak_flops(device, c.train.precision) or 989e12)
    e = estimate(c, lay, hw, calibration=cal_cache["cal"])
    return {"peak_bytes": e["per_rank_bytes"]["total"], "step_s": e["step_time_s"]}


def setup(args):
    """The run's config (bench shape, vocabulary, one micro-batch) and device, with the one-rank process group."""
    overrides = ([] if args.config else DEFAULT_OVERRIDES) + list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.zero is not None:
        overrides.append(f"parallel.zero_stage={args.zero}")
    cfg = load_config(args.config, overrides + ["parallel.tp=1"])
    m = cfg.model
    cfg.model = dataclasses.replace(m, real_vocab_size=args.vocab, vocab_size=padded_vocab(args.vocab, m.vocab_multiple))
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return cfg, one_rank()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, device = setup(args)
    except ConfigError as e:
        print(f"step: {e}", file=sys.stderr)
        return 2
    on_cuda = device.startswith("cuda")

    B, S, T = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len
    tokens = B * (S + T)
    print(f"model: d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, d_ff {cfg.model.d_ff}, "
          f"{cfg.model.n_encoder_layers}+{cfg.model.n_decoder_layers} layers, vocab {cfg.model.vocab_size}, "
          f"{count_parameters(cfg.model) / 1e6:.1f}M params; batch {B} x src {S} / tgt {T} = {tokens} tokens")
    where = torch.cuda.get_device_name(0) if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"run: {cfg.train.precision}, trainer ZeRO {args.zeros or cfg.parallel.zero_stage}, compile "
          f"{cfg.train.compile}{' (and compiled contenders)' if args.compiled else ''}, activation checkpointing "
          f"{cfg.parallel.activation_checkpointing}; {where}; {args.warmup} warm-up + {args.steps} timed rounds",
          flush=True)

    batches = [random_batch(cfg, s) for s in range(2)]
    runners, peaks, cuda_peaks, first, predicted, cal_cache = {}, {}, {}, {}, {}, {}
    precision_check = None
    for name, make in contenders(cfg, device, args).items():      # each alone: build + 2 steps under the tracker
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        # two steps: the first creates the optimizer state; eager (the tracker is a dispatch mode,
        # under which compiled code would never compile: launcher/precision.recording_matmuls)
        with torch.compiler.set_stance("force_eager"), PeakMemory() as pm:
            runners[name] = make()
            out = runners[name].step(batches[0])
            runners[name].step(batches[1])
            _sync(device)
        first[name] = float(out)
        peaks[name] = pm.peak
        if on_cuda:
            cuda_peaks[name] = torch.cuda.max_memory_allocated() - base
        if isinstance(runners[name], BenchTrainer):
            precision_check = precision_check or {op: sorted(str(d).removeprefix("torch.") for d in ds)
                                                  for op, ds in runners[name].fn.matmul_dtypes.items()}
            if args.plan:
                predicted[name] = _predict(cfg, name, runners[name], device, cal_cache)
    names = list(runners)
    times = {n: [] for n in names}
    for r in range(args.warmup + args.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dt = _timed_step(runners[n], batches[r % 2], device)
            if r >= args.warmup:
                times[n].append(dt)
    syncs = HostSyncs().install()
    host_reads = {n: [] for n in names if isinstance(runners[n], BenchTrainer)}
    cuda_syncs = {n: [] for n in host_reads}
    try:
        for n in host_reads:                            # after the timing: counting slows the steps it counts
            for k in range(2):
                reads, cs = _counted_step(runners[n], batches[k], device, syncs)
                host_reads[n].append(reads)
                cuda_syncs[n].append(cs)
    finally:
        syncs.uninstall()
    report(cfg, args, device, names, times, peaks, cuda_peaks, first, tokens, precision_check, host_reads,
           cuda_syncs, predicted, cal_cache.get("cal"))
    for r in runners.values():
        r.close()
    return 0


def _per_step(reads: list[dict]) -> dict:
    """Host reads per timed step, by who asked (the most seen in one step)."""
    out = {}
    for counts in reads:
        for k, v in counts.items():
            who = "project" if k.startswith("project:") else k
            out[who] = max(out.get(who, 0), v if who != "project" else sum(
                x for kk, x in counts.items() if kk.startswith("project:")))
    return out


def report(cfg, args, device, names, times, peaks, cuda_peaks, first, tokens, precision_check, host_reads,
           cuda_syncs, predicted, cal) -> None:
    B, S, T = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len
    on_cuda = device.startswith("cuda")
    step_flops = flops.train_flops(cfg.model, B, S, T)
    peak = flops.peak_flops(device, cfg.train.precision)
    med = {n: statistics.median(times[n]) for n in names}
    best = {n: min(times[n]) for n in names}
    print("first-step loss: " + ", ".join(f"{n} {first[n]:.4f}" for n in names))
    print()
    head = (f"{'':16s} {'step (s)':>9s} {'min (s)':>8s} {'tokens/s':>10s} {'at min':>8s} {'vs hf':>6s} "
            f"{'peak tensors (MiB)':>19s}")
    head += f" {'peak CUDA (MiB)':>16s}" if on_cuda else ""
    head += f" {'MFU':>6s}"
    print(head)
    rows = {}
    for n in names:
        u = flops.mfu(step_flops, med[n], peak, 1)
        rows[n] = {"step_s": med[n], "min_s": best[n], "tokens_per_s": tokens / med[n], "first_loss": first[n],
                   "peak_tensor_bytes": peaks[n], "peak_cuda_bytes": cuda_peaks.get(n), "mfu": u,
                   "vs_hf": (med["hf"] / med[n]) if "hf" in med else None}
        line = (f"{n:16s} {med[n]:9.4f} {best[n]:8.4f} {tokens / med[n]:10,.0f} {tokens / best[n]:8,.0f} "
                f"{(med['hf'] / med[n]) if 'hf' in med else float('nan'):6.2f} {peaks[n] / MIB:19,.1f}")
        if on_cuda:
            line += f" {cuda_peaks[n] / MIB:16,.1f}"
        line += f" {('%.1f%%' % (100 * u)) if u is not None else 'n/a':>6s}"
        print(line)
    print()
    trainers = [n for n in names if n in host_reads]
    if "hf" in med:
        for n in trainers:
            print(f"{n} / hf tokens/s: {med['hf'] / med[n]:.3f} (median), {best['hf'] / best[n]:.3f} (min)")
        print(f"bare / hf: {med['hf'] / med['bare']:.3f} (median), {best['hf'] / best['bare']:.3f} (min)")
    overhead = {}
    for n in trainers:
        bare = "bare+compile" if n.endswith("+compile") and "bare+compile" in times else "bare"
        # each round times the two back to back: the median of the per-round ratios cancels slow drift
        # in machine load better than the ratio of the medians
        paired = sorted(t / b for t, b in zip(times[n], times[bare]))
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        overhead[n] = statistics.median(paired) - 1
        label = "trainer" if n == "trainer" else n
        print(f"{label} overhead over the {bare} loop: {100 * overhead[n]:+.1f}% (median of per-round ratios; "
              f"quartiles {100 * (q1 - 1):+.1f}% .. {100 * (q3 - 1):+.1f}%), "
              f"{100 * (med[n] / med[bare] - 1):+.1f}% (ratio of medians), "
              f"{100 * (best[n] / best[bare] - 1):+.1f}% (ratio of minima)")
    compiled = {n: med[n.removesuffix("+compile")] / med[n] for n in names if n.endswith("+compile")}
    for n, x in compiled.items():
        print(f"compiled speed-up {n.removesuffix('+compile')}: {x:.3f}x")
    print(f"precision check (train.precision={cfg.train.precision}), the first step's matmuls: "
          + ", ".join(f"{op} {'/'.join(ds)}" for op, ds in sorted((precision_check or {}).items())))
    syncs = {n: _per_step(host_reads[n]) for n in trainers}
    for n in trainers:
        print(f"host reads per step, {n}: " + ", ".join(f"{k} {v}" for k, v in sorted(syncs[n].items()))
              + (f"; CUDA sync debug warnings {max(cuda_syncs[n])}" if on_cuda else ""))
    for n, p in predicted.items():
        got = cuda_peaks.get(n) if on_cuda else peaks[n]
        print(f"planner, {n}: peak {p['peak_bytes'] / MIB:,.1f} MiB predicted / {got / MIB:,.1f} MiB measured "
              f"({p['peak_bytes'] / got:.2f}); step {p['step_s']:.4f} s predicted (calibrated) / {med[n]:.4f} s "
              f"({p['step_s'] / med[n]:.2f})")
    print(f"model FLOPs per step: {step_flops:.3e}; device peak: "
          f"{'%.3g FLOP/s' % peak if peak else 'unknown (set ENCDEC_PEAK_FLOPS for MFU)'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": args.config, "precision": cfg.train.precision, "device": device, "tokens": tokens,
                       "contenders": rows, "overhead": overhead, "compiled_speedup": compiled,
                       "precision_check": precision_check, "host_reads_per_step": syncs,
                       "cuda_sync_warnings": {n: max(v) for n, v in cuda_syncs.items()} if on_cuda else {},
                       "predicted": predicted, "calibration": cal,
                       "cuda_peaks": cuda_peaks}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
