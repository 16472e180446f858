"""bf16 two ways, against fp32: DeepSpeed's torch_autocast section (what encdec uses) and DeepSpeed's
own bf16 mode, by step time, peak memory and numerics, side by side in one run.

    python bench/precision.py [--config configs/test-tiny.yaml] [--steps 20] [--zero 1] [overrides ...]

One process (one rank), the same initial weights and the same batches for three DeepSpeed engines:
  fp32       the engine in fp32, no autocast
  autocast   fp32 engine, bf16 autocast inside its forward (launcher/precision.py's config section):
             fp32 weights, gradients and their reduction, residual stream and loss; matmuls in bf16
  ds-bf16    DeepSpeed's "bf16" mode: bf16 weights and gradients, fp32 master weights in the
             optimizer; everything the model computes runs in bf16
Printed per engine: median step time (steps 3..), peak live tensor bytes (build + first step,
bench/measure.PeakMemory), the loss after each of --steps steps against fp32's (largest relative
gap), and the relative distance of the final (fp32-master) parameters from fp32's.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.contenders import one_rank, random_batch  # noqa: E402
from bench.measure import PeakMemory  # noqa: E402
from launcher.config import load_config  # noqa: E402
from launcher.precision import Precision  # noqa: E402
from launcher.training.engine import build_optimizer, ds_config, to_device  # noqa: E402
from model import build, padded_vocab  # noqa: E402

MIB = 2 ** 20


def engine_for(cfg, model, mode: str, zero: int, device: str):
    import deepspeed
    section = {"fp32": {}, "autocast": Precision("bf16").deepspeed_config(), "ds-bf16": {"bf16": {"enabled": True}}}
    model.to(device)
    opt, _ = build_optimizer(cfg, model, device)
    c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=zero),
                            train=dataclasses.replace(cfg.train, precision="fp32"))
    config = {**ds_config(c, 1, n_params=sum(p.numel() for p in model.parameters())), **section[mode]}
    config["gradient_clipping"] = cfg.optim.grad_clip             # the trainer clips ZeRO 0 itself
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def master_params(engine) -> torch.Tensor:
    """The fp32 (master) parameters as one vector, in the optimizer's order (ZeRO 1-2: its flat fp32
    partitions, the masters of ds-bf16 too; ZeRO 0: the parameters of its groups)."""
    opt = engine.optimizer
    flat = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", None)
    if flat:
        return torch.cat([g.detach().float().reshape(-1) for g in flat])
    groups = getattr(opt, "param_groups", None) or opt.optimizer.param_groups
    return torch.cat([p.detach().float().reshape(-1) for g in groups for p in g["params"]])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/test-tiny.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(os.path.join(ROOT, a.config), a.overrides)
    m = cfg.model
    cfg.model = dataclasses.replace(m, real_vocab_size=a.vocab, vocab_size=padded_vocab(a.vocab, m.vocab_multiple))
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    device = one_rank()
    torch.manual_seed(cfg.train.seed)
    init = build(cfg.model)
    batches = [to_device(random_batch(cfg, s), device) for s in range(a.steps)]
    res = {}
    for mode in ("fp32", "autocast", "ds-bf16"):
        torch.manual_seed(0)
        def step(b):
            loss, n = engine(b["src"], None, b["tgt_in"], b["labels"])
            engine.backward(loss / n)
            engine.step()
            return float(loss.detach()) / float(n)                  # (waits for the step)
        with PeakMemory() as pm:                       # build + the first step (optimizer state) tracked
            engine = engine_for(cfg, copy.deepcopy(init), mode, a.zero, device)
            start = master_params(engine)
            losses = [step(batches[0])]
        times = []
        for b in batches[1:]:                          # timed without the tracker (it costs per operator)
            t0 = time.perf_counter()
            losses.append(step(b))
            times.append(time.perf_counter() - t0)
        res[mode] = {"losses": losses, "step_s": statistics.median(times[1:] or times or [float("nan")]),
                     "peak": pm.peak, "params": master_params(engine), "start": start}
        engine.destroy()
    ref = res["fp32"]
    print(f"{a.config}: {device}, ZeRO {a.zero}, {a.steps} steps, batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.max_src_len}/{cfg.data.max_tgt_len}, {sum(p.numel() for p in init.parameters()) / 1e6:.2f}M params")
    print(f"{'':10s} {'step (s)':>9s} {'peak MiB':>9s} {'last loss':>10s} {'max |loss - fp32| / fp32':>25s} "
          f"{'|params - fp32| / |fp32 update|':>32s}")
    figures = {}
    for mode, r in res.items():
        gap = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"]))
        dist = float((r["params"] - ref["params"]).norm() / (ref["params"] - ref["start"]).norm())
        print(f"{mode:10s} {r['step_s']:9.4f} {r['peak'] / MIB:9.2f} {r['losses'][-1]:10.4f} {gap:25.2e} {dist:32.3e}")
        figures[mode] = {"step_s": r["step_s"], "peak_bytes": r["peak"], "max_loss_gap": gap, "param_distance": dist}
    if a.json:
        import json
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
