"""Where a training step's time goes: torch.profiler over a few steps of bench/step.py's contenders.

    python bench/profile_step.py --config configs/transformer-base.yaml --precision bf16 --vocab 32000 \
        --contenders bare,trainer,bare+compile [--steps 3] [--top 12] [--json OUT.json]

For each contender (built and warmed up like bench/step.py's, one after another in one process):
the wall time of a step, the device time of the kernels it launched, their ratio (below 1: the
host does not keep the device busy: launch-bound, or waiting on the host), and the kernel time by
kind (matmul, attention, normalization, elementwise/fused, reductions such as the loss, optimizer,
copies and casts, communication), then the most expensive kernels. On CPU the same table lists
operators instead of kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import step as bench_step  # noqa: E402
from bench.contenders import BareLoop, random_batch  # noqa: E402

KINDS = [   # first match wins; kernel names of cuBLAS/cuDNN/flash/triton/ATen
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|xmma|cutlass|sm\d+_.*(h|s)\d*gemm|cublas|nvjet|matmul"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adam"),
    ("norm", r"layer_norm|layernorm|rms_?norm"),
    ("loss/softmax", r"softmax|cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter"),
    ("copy/cast", r"copy|memcpy|memset|cast|convert|to_copy|cat|fill"),
    ("compiled (triton)", r"^triton_"),
    ("embedding", r"embedding|index|gather|scatter|sort|radix"),
    ("reduction", r"reduce|sum|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|dropout|bernoulli|relu|gelu|add|mul|where"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pat in KINDS:
        if re.search(pat, low):
            return kind
    return "other"


def profile_contender(runner, batches, device, steps: int) -> dict:
    on_cuda = device.startswith("cuda")
    for i in range(3):                                  # warm: optimizer state, compilation, autotuning
        runner.step(batches[i % 2])
    bench_step._sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            runner.step(batches[i % 2])
        bench_step._sync(device)
        wall = (time.perf_counter() - t0) / steps
    per_kernel = collections.Counter()
    launches = collections.Counter()
    for e in prof.events():
        if on_cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            per_kernel[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif e.cpu_parent is None:                      # top-level operators on CPU
            per_kernel[e.name] += e.cpu_time_total
        launches[e.name] += 1
    total = sum(per_kernel.values()) / steps / 1e6     # s per step
    kinds = collections.Counter()
    for n, us in per_kernel.items():
        kinds[kind_of(n)] += us / steps / 1e6
    top = [(n, us / steps / 1e6, launches[n] // steps) for n, us in per_kernel.most_common()]
    return {"wall_s": wall, "device_s": total, "busy": total / wall if wall else None,
            "kernels_per_step": sum(launches.values()) // steps, "kinds": dict(kinds.most_common()), "top": top}


def report(name: str, r: dict, top: int) -> None:
    print(f"\n== {name}: wall {1e3 * r['wall_s']:.2f} ms/step, kernels {1e3 * r['device_s']:.2f} ms/step "
          f"(device busy {100 * (r['busy'] or 0):.0f}%), {r['kernels_per_step']} launches/step")
    for k, s in r["kinds"].items():
        print(f"   {k:20s} {1e3 * s:8.2f} ms  {100 * s / r['device_s']:5.1f}%")
    print("   top kernels (ms/step, launches/step):")
    for n, s, c in r["top"][:top]:
        print(f"     {1e3 * s:7.2f} {c:5d}  {n[:110]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config")
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--contenders", default="bare,trainer",
                   help="comma-separated: trainer, bare, hf, trainer+compile, bare+compile, bare+compile-layers")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json")
    a = p.parse_args(argv)
    want = a.contenders.split(",")
    args = bench_step.parse_args(([f"--config={a.config}"] if a.config else [])
                                 + ([f"--precision={a.precision}"] if a.precision else [])
                                 + [f"--vocab={a.vocab}", "--compiled=all"] + list(a.overrides))
    cfg, device = bench_step.setup(args)
    makers = bench_step.contenders(cfg, device, args)
    makers["bare+compile-layers"] = lambda: BareLoop(cfg, device, hf=False, compile="layers")
    unknown = [n for n in want if n not in makers]
    if unknown:
        print(f"profile_step: unknown contender(s) {', '.join(unknown)}; known: {', '.join(makers)}", file=sys.stderr)
        return 2
    batches = [random_batch(cfg, s) for s in range(2)]
    results = {}
    for n in want:
        runner = makers[n]()
        results[n] = profile_contender(runner, batches, device, a.steps)
        report(n, results[n], a.top)
        runner.close()
        del runner
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({n: {**r, "top": r["top"][:40]} for n, r in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
