"""The GPU performance checks in one prepared run (bench/gpu_check.sh starts it), printing one table.

Parts (each a subprocess with its own timeout; a part that fails or times out leaves its rows empty),
run in this order so the most important figures come first:
  base      configs/transformer-base.yaml, bf16, batch 64 x 512/128, vocab 32k: bench/step.py with a
            trainer per ZeRO stage (1, 0, 2, 3), the bare loop and the stock HF class; the planner's
            prediction beside each trainer
  1b        configs/1b.yaml on one GPU (tp 1, micro-batch 16, no checkpointing), bf16: trainers at
            ZeRO 1, 0, 2, 3 and the bare loop; MFU; the planner beside
  eval      bench/inference.py on transformer-base: `encdec eval` / `generate` on the GPU, fp32 and bf16
  compiled  transformer-base: the ZeRO-1 trainer eager and with train.compile, the bare loop
  (only when asked) 1b-compiled: the same for configs/1b.yaml; precision: bench/precision.py,
            bf16 by autocast vs DeepSpeed's bf16 mode vs fp32
The table: the first step's matmul dtypes, trainer / bare / HF tokens/s and their ratios (eager and
compiled), the trainer's overhead over the bare loop per ZeRO stage, 1b MFU (eager and compiled),
host reads per step, eval tokens/s, the planner's memory and step time against the measured ones,
each with its target.

    python bench/gpu_check.py [--out DIR] [--parts base,1b,eval] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["bench/step.py", "--config", "configs/transformer-base.yaml", "--precision", "bf16", "--vocab", "32000"]
ONE_B = ["bench/step.py", "--config", "configs/1b.yaml", "--precision", "bf16", "--vocab", "32000",
         "parallel.activation_checkpointing=false", "train.micro_batch_size=16"]
PARTS = {
    "base": (100, BASE + ["--zeros", "1,0", "--forced-zeros", "1", "--plan"]),
    "1b": (150, ONE_B + ["--skip-hf", "--zeros", "1", "--forced-zeros", "1,3", "--plan"]),
    "compiled": (140, BASE + ["--skip-hf", "--zeros", "1", "--compiled", "trainer"]),
    "1b-compiled": (240, ONE_B + ["--skip-hf", "--zeros", "1", "--compiled", "trainer"]),
    # (4000 pairs, 3 passes of eval + generation at batch 32 took over 85 s on an H200: sized down)
    "eval": (150, ["bench/inference.py", "--config", "configs/transformer-base.yaml", "--pairs", "2000",
                   "--batch-size", "128", "--device", "auto", "data.objective=pairs"]),
    # not in the default parts (time): bf16 through autocast vs DeepSpeed's bf16 mode, against fp32
    "precision": (120, ["bench/precision.py", "--config", "configs/transformer-base.yaml", "--steps", "20",
                        "--vocab", "32000", "train.micro_batch_size=16"]),
}


def run_part(name: str, out: str, work: str, steps: int) -> dict | None:
    """Runs one part: its log in `work`, its JSON in `out` (few files there: the device tool returns few)."""
    timeout, cmd = PARTS[name]
    path = os.path.join(out, f"{name}.json")
    args = [sys.executable, cmd[0], "--json", path, *cmd[1:]] + (["--steps", str(steps)] if cmd[0] == "bench/step.py" else [])
    log = os.path.join(work, f"{name}.log")
    t0 = time.time()
    print(f"=== {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"=== {name}: status {rc}, {time.time() - t0:.0f} s (log {log})", flush=True)
    with open(log, encoding="utf-8", errors="replace") as f:
        tail = [ln for ln in f.read().splitlines() if "[WARNING]" not in ln][-40:]
    print("\n".join(tail), flush=True)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pct(x):
    return "-" if x is None else f"{100 * x:+.1f}%"


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    base, big, ev = res.get("base"), res.get("1b"), res.get("eval")
    for name, r, comp in (("transformer-base", base, res.get("compiled")), ("1b", big, res.get("1b-compiled"))):
        if not r:
            rows.append((f"{name}: (no result)", "-", "-"))
            continue
        c = r["contenders"]
        pc = r.get("precision_check") or {}
        rows.append((f"{name}: first-step matmul dtypes", ", ".join(f"{k} {'/'.join(v)}" for k, v in sorted(pc.items())),
                     "bfloat16 only"))
        cc = (comp or {}).get("contenders") or {}
        compiled_tps = (cc.get("trainer-z1+compile") or {}).get("tokens_per_s")
        if "hf" in c:
            hf = c["hf"]["tokens_per_s"]
            rows.append((f"{name}: tokens/s trainer-z1 / bare / hf / trainer-z1 compiled",
                         " / ".join(_f(c[n]["tokens_per_s"], "{:,.0f}") for n in ("trainer-z1", "bare", "hf"))
                         + f" / {_f(compiled_tps, '{:,.0f}')}", ""))
            rows.append((f"{name}: trainer-z1 vs hf (eager, compiled)",
                         f"{_f(c['trainer-z1']['vs_hf'])}x, {_f(compiled_tps and compiled_tps / hf)}x", ">= 1.3x"))
        else:
            rows.append((f"{name}: tokens/s trainer-z1 / bare / trainer-z1 compiled",
                         f"{_f(c['trainer-z1']['tokens_per_s'], '{:,.0f}')} / {_f(c['bare']['tokens_per_s'], '{:,.0f}')}"
                         f" / {_f(compiled_tps, '{:,.0f}')}", ""))
        for z in (0, 1, 2, 3):
            n = f"trainer-z{z}"
            if n in c:
                rows.append((f"{name}: trainer overhead over bare, ZeRO {z}" + (" (runs ZeRO 0 at dp 1)" if z else ""),
                             _pct(r["overhead"].get(n)), "<= +10%" if z < 3 else "(reported)"))
        for z in (1, 2, 3):
            n = f"deepspeed-z{z}"
            if n in c:
                rows.append((f"{name}: DeepSpeed ZeRO {z} forced at dp 1, overhead over bare", _pct(r["overhead"].get(n)),
                             "(reported)"))
        speedup = ((comp or {}).get("compiled_speedup") or {}).get("trainer-z1+compile")
        rows.append((f"{name}: compiled / eager (trainer ZeRO 1, same process)", f"{_f(speedup)}x", ">= 1.15x"))
        if name == "1b":
            mfu_c = (cc.get("trainer-z1+compile") or {}).get("mfu")
            rows.append(("1b: MFU trainer-z1 eager, compiled",
                         f"{_f(c['trainer-z1']['mfu'] and 100 * c['trainer-z1']['mfu'], '{:.1f}%')}, "
                         f"{_f(mfu_c and 100 * mfu_c, '{:.1f}%')}", ">= 45%"))
        hr = (r.get("host_reads_per_step") or {}).get("trainer-z1", {})
        cs = (r.get("cuda_sync_warnings") or {}).get("trainer-z1")
        rows.append((f"{name}: host reads per step, trainer-z1 (project / deepspeed; CUDA sync warnings)",
                     f"{hr.get('project', '-')} / {hr.get('deepspeed', 0)}; {_f(cs, '{}')}", "project 1"))
        for n, p in sorted((r.get("predicted") or {}).items()):
            if n.endswith("+compile"):
                continue
            got = (r.get("cuda_peaks") or {}).get(n) or c[n]["peak_tensor_bytes"]
            rows.append((f"{name}: planner / measured, {n}: peak memory, step time",
                         f"{_f(p['peak_bytes'] / got)}, {_f(p['step_s'] / c[n]['step_s'])}", "within 15%, 25%"))
    for mode, f in (res.get("precision") or {}).items():
        rows.append((f"precision {mode}: step s, peak MiB, max loss gap, param distance vs fp32",
                     f"{f['step_s']:.4f}, {f['peak_bytes'] / 2 ** 20:,.0f}, {f['max_loss_gap']:.1e}, "
                     f"{f['param_distance']:.2e}", ""))
    if ev:
        for prec, f in ev["figures"].items():
            rows.append((f"eval transformer-base ({prec}, {f['device']}): target tokens/s, examples/s",
                         f"{f['target_tokens_per_s']:,.0f}, {f['examples_per_s']:,.1f}", ""))
    else:
        rows.append(("eval: (no result)", "-", "-"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/encdec-gpu-check")
    p.add_argument("--parts", default="base,1b,eval,compiled")
    p.add_argument("--work", default="/tmp/encdec-gpu-check-work", help="the parts' logs")
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    res = {n: run_part(n, a.out, a.work, a.steps) for n in a.parts.split(",") if n}
    rows = table(res)
    w = max(len(r[0]) for r in rows)
    lines = [f"{'check':{w}s}  {'measured':40s}  target", "-" * (w + 60)]
    lines += [f"{k:{w}s}  {v:40s}  {t}" for k, v, t in rows]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "gpu_check_table.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
