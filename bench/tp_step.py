"""Step time and peak memory of the same model under TP=1 and TP=2, printed side by side.

    python bench/tp_step.py                                   # built-in mid-size model (below)
    python bench/tp_step.py --zero 2 --precision fp32 --steps 10
    python bench/tp_step.py --config configs/transformer-base.yaml train.micro_batch_size=4 data.max_src_len=256

Each layout runs in fresh processes, one after the other (never both at once): TP=1 is one
rank, TP=2 is two ranks of one tensor-parallel group (dp = 1 in both, so both see the same
micro-batch every step and the same global batch). Each rank builds the unsharded model from
the same seed, applies `parallelize`, and trains it through a real DeepSpeed engine (ZeRO
stage --zero, AdamW: launcher/training/engine.py's build_engine) exactly as the trainer does: fp32 engine, bf16 from
torch.autocast, loss = summed token loss / target tokens. Backend: NCCL on GPUs, gloo on CPU.
On CPU each rank runs --threads intra-op threads (default 1: a core per rank, the analogue of a
GPU per rank); `--tp 1 --threads 2` gives the one TP=1 rank the whole 2-core machine instead.

Measured, per layout:
  step time     forward + backward + optimizer step between two barriers (device synchronised),
                median over --steps timed steps after --warmup untimed ones
  tokens/s      (source + target tokens of the batch) / median step time
  peak memory   per rank, max over the layout's ranks: torch.cuda.max_memory_allocated on GPUs;
                on CPU the peak RSS (getrusage ru_maxrss) and its growth over the rank's RSS at start
                (a forked rank starts with the parent's imported libraries already resident)
  state bytes   parameters, gradients and optimizer state (AdamW moments + ZeRO's fp32 master
                partitions) held by the rank, summed over the distinct memory those tensors cover,
                taken right after backward of one extra untimed step
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from deepspeed.runtime.utils import clip_grad_norm_  # noqa: E402

from launcher.config import ConfigError, RunConfig, load_config  # noqa: E402
from launcher.dist_env import free_port, read_env  # noqa: E402
from launcher.parallel import ParallelDims, validate_layout  # noqa: E402
from launcher.training.engine import build_engine, init_distributed  # noqa: E402
from model import count_parameters, padded_vocab  # noqa: E402

# The default model: transformer-base widths, 3+3 layers, seconds per step on 2 CPU cores.
DEFAULT_OVERRIDES = [
    "name=bench-tp", "model.d_model=512", "model.n_heads=8", "model.d_ff=2048", "model.n_encoder_layers=3",
    "model.n_decoder_layers=3", "model.max_positions=512", "data.max_src_len=128", "data.max_tgt_len=64",
    "train.micro_batch_size=8", "train.global_batch_size=8", "parallel.zero_stage=1", "train.precision=bf16",
]
MIB = 2 ** 20


# ----------------------------------------------------------------------------- setup (parent)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.d_model=256")
    p.add_argument("--config", help="YAML config in configs/ (default: the built-in mid-size model)")
    p.add_argument("--tp", default="1,2", help="comma-separated TP degrees to compare (default 1,2)")
    p.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default: 1 for the built-in model, else the config's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: the config's train.precision")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--vocab", type=int, default=8192,
                   help="vocabulary size when the config leaves model.vocab_size to the tokenizer (default 8192)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads per rank (default 1: a core per rank, as a GPU per rank)")
    return p.parse_args(argv)


def bench_config(args) -> tuple[RunConfig, list[int]]:
    """The run config (validated) with the vocabulary fixed and padded for every compared TP degree."""
    try:
        tps = [int(x) for x in args.tp.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--tp: expected comma-separated integers, got {args.tp!r}")
    if not tps or min(tps) < 1:
        raise ConfigError(f"--tp: expected degrees >= 1, got {args.tp!r}")
    overrides = list(args.overrides)
    if args.zero is not None:
        overrides.append(f"parallel.zero_stage={args.zero}")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(args.config, ([] if args.config else DEFAULT_OVERRIDES) + overrides)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.vocab < 3:
        raise ConfigError(f"--vocab: must be >= 3, got {args.vocab}")
    m = cfg.model
    real = m.real_vocab_size or m.vocab_size or args.vocab
    mult = math.lcm(m.vocab_multiple, *tps)          # one padded vocabulary for every layout: the same model
    cfg.model = dataclasses.replace(m, real_vocab_size=real, vocab_size=padded_vocab(max(m.vocab_size, real), mult))
    cfg.train.global_batch_size = cfg.train.micro_batch_size      # dp = 1: one micro-batch per step
    for tp in tps:                                    # the trainer's one layout check, per layout
        validate_layout(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp)), tp, tp)
    return cfg, tps


# ----------------------------------------------------------------------------- one rank

def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_batch(cfg: RunConfig, seed: int, device: str) -> dict:
    """Full-length random token pairs: src (B, S), tgt_in / labels (B, T), no padding."""
    g = torch.Generator().manual_seed(seed)
    B, S, T, V = cfg.train.micro_batch_size, cfg.data.max_src_len, cfg.data.max_tgt_len, cfg.model.real_vocab_size
    src = torch.randint(2, V, (B, S), generator=g)
    tgt = torch.randint(2, V, (B, T + 1), generator=g)
    b = {"src": src, "src_mask": torch.ones(B, S, dtype=torch.bool), "tgt_in": tgt[:, :-1].contiguous(),
         "labels": tgt[:, 1:].contiguous()}
    return {k: v.to(device) for k, v in b.items()}


def _tensors(v, depth=3):
    if torch.is_tensor(v):
        yield v
    elif depth and isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x, depth - 1)
    elif depth and isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x, depth - 1)


def _covered_bytes(tensors) -> int:
    """Bytes of the union of the tensors' data ranges (views and flat buffers counted once)."""
    spans = sorted((str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in tensors if t is not None and t.numel())
    total, cur = 0, None
    for dev, a, b in spans:
        if cur and dev == cur[0] and a <= cur[2]:
            cur = (dev, cur[1], max(cur[2], b))
        else:
            total += cur[2] - cur[1] if cur else 0
            cur = (dev, a, b)
    return total + (cur[2] - cur[1] if cur else 0)


def state_bytes(engine) -> dict:
    """Parameter, gradient and optimizer-state bytes this rank holds; each byte counted once, in
    that order of priority (so ZeRO's views of the model parameters count as parameters)."""
    params, grads, optim = [], [], []
    for p in engine.module.parameters():
        params.append(getattr(p, "ds_tensor", p.data))          # ZeRO-3 keeps only its partition
        grads.append(p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)                       # ZeRO wraps the torch optimizer
    for st in inner.state.values():
        optim += [v for v in st.values() if torch.is_tensor(v)]
    for group in inner.param_groups:
        for p in group["params"]:                                # ZeRO: the fp32 master partitions
            optim.append(p)
            grads.append(p.grad)
    if inner is not opt:
        for name, v in vars(opt).items():
            if "ipg" in name:                                    # reduction buckets, freed after backward
                continue
            if "grad" in name:
                grads += list(_tensors(v))
            elif "fp32" in name:
                optim += list(_tensors(v))
    p_b = _covered_bytes(params)
    pg_b = _covered_bytes(params + grads)
    all_b = _covered_bytes(params + grads + optim)
    n = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    return {"params": p_b, "grads": pg_b - p_b, "optim": all_b - pg_b, "n_params": n}


def _worker(rank: int, tp: int, port: int, cfg: RunConfig, opts: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(tp))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(opts["threads"])
    rss_start = _rss_now()
    device = init_distributed(read_env(), cfg.train.collective_timeout_s)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    mesh = ParallelDims.from_world(tp, tp).build(rank)
    torch.manual_seed(cfg.train.seed)
    engine, _ = build_engine(cfg, mesh, device, accum=1)       # exactly the trainer's engine
    batches = [random_batch(cfg, seed, device) for seed in range(2)]
    autocast_dev = "cuda" if device.startswith("cuda") else "cpu"
    clip = cfg.optim.grad_clip if cfg.parallel.zero_stage == 0 else 0.0   # as the trainer: ZeRO clips itself

    def step(b, probe=False):
        with torch.autocast(autocast_dev, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss, n = engine(b["src"], b["src_mask"], b["tgt_in"], b["labels"])
        engine.backward(loss / n)
        if clip:
            clip_grad_norm_(engine.module.parameters(), clip, mpu=mesh.deepspeed_mpu())
        held = state_bytes(engine) if probe else None
        engine.step()
        return (loss / n).item(), held

    times, losses = [], []
    for i in range(opts["warmup"] + opts["steps"]):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = step(batches[i % len(batches)])
        _sync(device)
        dist.barrier()
        if i >= opts["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    _, held = step(batches[0], probe=True)                      # untimed: optimizer state exists now
    if device.startswith("cuda"):
        peak, growth = torch.cuda.max_memory_allocated(), None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
        growth = peak - rss_start
    queue.put({"rank": rank, "times": times, "losses": losses, "peak": peak, "growth": growth, **held})
    engine.destroy()
    dist.destroy_process_group()


def run_layout(tp: int, cfg: RunConfig, opts: dict) -> list[dict]:
    """Runs one layout on `tp` fresh processes; returns each rank's figures, rank order."""
    method = "spawn" if torch.cuda.is_available() else "fork"   # forked ranks start at once on CPU
    queue = mp.get_context(method).SimpleQueue()
    mp.start_processes(_worker, args=(tp, free_port(), cfg, opts, queue), nprocs=tp, join=True,
                       start_method=method)
    return sorted((queue.get() for _ in range(tp)), key=lambda r: r["rank"])


# ----------------------------------------------------------------------------- report

def summarize(tp: int, ranks: list[dict], tokens: int) -> dict:
    med = statistics.median(ranks[0]["times"])
    growth = [r["growth"] for r in ranks if r["growth"] is not None]
    return {"tp": tp, "ranks": f"{tp} x 1", "step": med, "min": min(ranks[0]["times"]),
            "max": max(ranks[0]["times"]), "tok_s": tokens / med,
            "peak": max(r["peak"] for r in ranks), "growth": max(growth) if growth else None,
            "n_params": max(r["n_params"] for r in ranks), "params": max(r["params"] for r in ranks),
            "grads": max(r["grads"] for r in ranks), "optim": max(r["optim"] for r in ranks),
            "state": max(r["params"] + r["grads"] + r["optim"] for r in ranks),
            "loss0": ranks[0]["losses"][0], "loss": ranks[0]["losses"][-1]}


def format_table(rows: list[dict], on_cuda: bool) -> str:
    mib = lambda v: f"{v / MIB:,.1f}"  # noqa: E731
    peak_name = "peak CUDA allocated per rank (MiB)" if on_cuda else "peak RSS per rank (MiB)"
    lines = [
        ("ranks (tp x dp)", lambda r: r["ranks"], None),
        ("step time, median (s)", lambda r: f"{r['step']:.3f}", "step"),
        ("step time, min / max (s)", lambda r: f"{r['min']:.2f} / {r['max']:.2f}", None),
        ("tokens/s (src + tgt)", lambda r: f"{r['tok_s']:,.0f}", "tok_s"),
        (peak_name, lambda r: mib(r["peak"]), "peak"),
    ]
    if not on_cuda:
        lines.append(("  growth over rank start (MiB)", lambda r: mib(r["growth"]), "growth"))
    lines += [
        ("parameters per rank (M)", lambda r: f"{r['n_params'] / 1e6:.2f}", "n_params"),
        ("  param bytes per rank (MiB)", lambda r: mib(r["params"]), "params"),
        ("  grad bytes per rank (MiB)", lambda r: mib(r["grads"]), "grads"),
        ("  optim bytes per rank (MiB)", lambda r: mib(r["optim"]), "optim"),
        ("param+grad+optim per rank (MiB)", lambda r: mib(r["state"]), "state"),
        ("loss, first / last step", lambda r: f"{r['loss0']:.3f} / {r['loss']:.3f}", None),
    ]
    head = ["", *(f"TP={r['tp']}" for r in rows), *(f"TP{r['tp']}/TP{rows[0]['tp']}" for r in rows[1:])]
    table = [head]
    for name, fmt, key in lines:
        ratios = [(f"{r[key] / rows[0][key]:.2f}" if key and rows[0][key] else "") for r in rows[1:]]
        table.append([name, *(fmt(r) for r in rows), *ratios])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
                     for row in table)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, tps = bench_config(args)
    except ConfigError as e:
        print(f"tp_step: {e}", file=sys.stderr)
        return 2
    on_cuda = torch.cuda.is_available()
    if on_cuda and max(tps) > torch.cuda.device_count():
        print(f"tp_step: --tp {args.tp} needs {max(tps)} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * (cfg.data.max_src_len + cfg.data.max_tgt_len)
    if args.threads < 1:
        print(f"tp_step: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    opts = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    print(f"model: d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, {m.n_encoder_layers}+{m.n_decoder_layers} "
          f"layers, vocab {m.real_vocab_size} (padded {m.vocab_size}), {count_parameters(m) / 1e6:.1f}M params "
          f"[{args.config or 'built-in default'}]")
    print(f"batch: {t.micro_batch_size} x src {cfg.data.max_src_len} / tgt {cfg.data.max_tgt_len} = {tokens} tokens "
          f"per step, the same for every layout (dp = 1)")
    where = (f"{torch.cuda.get_device_name(0)}, nccl" if on_cuda else
             f"cpu, gloo, {args.threads} intra-op thread(s) per rank, {len(os.sched_getaffinity(0))} cores, "
             f"load average {os.getloadavg()[0]:.1f}")
    prec = "bf16 autocast over an fp32" if t.precision == "bf16" else "fp32"
    print(f"run: ZeRO {cfg.parallel.zero_stage}, {prec} DeepSpeed engine, AdamW, {where}; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    rows = []
    for tp in tps:
        t0 = time.perf_counter()
        rows.append(summarize(tp, run_layout(tp, cfg, opts), tokens))
        print(f"  TP={tp}: done in {time.perf_counter() - t0:.0f} s (load average now {os.getloadavg()[0]:.1f})",
              flush=True)
    print()
    print(format_table(rows, on_cuda))
    return 0


if __name__ == "__main__":
    sys.exit(main())
