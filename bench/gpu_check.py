"""The GPU performance checks in one prepared run (bench/gpu_check.sh starts it), printing one table.

Parts (each a subprocess with its own timeout; a part that fails or times out leaves its rows empty;
the table is rewritten after each part), run in this order so the most important figures come first:
  base      configs/transformer-base.yaml, bf16, batch 64 x 512/128, vocab 32k: bench/step.py with the
            trainer at ZeRO 1 and 0 (one data-parallel rank runs ZeRO 0), DeepSpeed's ZeRO 1 and 3
            forced, the bare loop and the stock HF class; the planner's prediction beside each trainer
  compiled  transformer-base: the trainer and the bare loop, eager and with train.compile, and HF
  1b        configs/1b.yaml on one GPU (tp 1, micro-batch 16, no checkpointing), bf16: the trainer
            and the bare loop; MFU; the planner beside
  1b-compiled  the trainer eager and with train.compile, the bare loop, configs/1b.yaml
  eval      bench/inference.py on transformer-base: `encdec eval` / `generate` on the GPU, fp32 and bf16
  precision bench/precision.py: bf16 by autocast vs DeepSpeed's bf16 mode vs fp32
The table: the first step's matmul dtypes, trainer / bare / HF tokens/s and their ratios (eager and
compiled), the trainer's overhead over the bare loop per ZeRO stage, 1b MFU (eager and compiled),
host reads per step, eval tokens/s, the planner's memory and step time against the measured ones,
each with its target.

    python bench/gpu_check.py [--out DIR] [--parts base,compiled,1b,1b-compiled,eval,precision] [--steps 10]
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
PARTS = {   # name: (timeout s, command); sized from the H200 runs (each part's time there in the comment)
    "base": (100, BASE + ["--zeros", "1,0", "--forced-zeros", "1,3", "--plan"]),
    "compiled": (150, BASE + ["--zeros", "1", "--compiled", "all"]),
    "1b": (120, ONE_B + ["--skip-hf", "--zeros", "1", "--plan"]),
    "1b-compiled": (180, ONE_B + ["--skip-hf", "--zeros", "1", "--compiled", "trainer"]),
    "eval": (130, ["bench/inference.py", "--config", "configs/transformer-base.yaml", "--pairs", "2000",
                   "--batch-size", "128", "--device", "auto", "data.objective=pairs"]),
    # bf16 through autocast vs DeepSpeed's bf16 mode, against fp32
    "precision": (90, ["bench/precision.py", "--config", "configs/transformer-base.yaml", "--steps", "20",
                       "--vocab", "32000", "train.micro_batch_size=16"]),
}
DEFAULT_PARTS = "base,compiled,1b,1b-compiled,eval,precision"


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


def _tps(c: dict, *names) -> str:
    return " / ".join(_f((c.get(n) or {}).get("tokens_per_s"), "{:,.0f}") for n in names)


def _mfu(c: dict, n: str) -> str:
    u = (c.get(n) or {}).get("mfu")
    return _f(u and 100 * u, "{:.1f}%")


def _model_rows(name: str, r: dict | None, comp: dict | None) -> list[tuple[str, str, str]]:
    rows = []
    r = r or comp                      # the compiled part times the eager contenders too
    if not r:
        return [(f"{name}: (no result)", "-", "-")]
    c = r["contenders"]
    pc = r.get("precision_check") or {}
    rows.append((f"{name}: first-step matmul dtypes", ", ".join(f"{k} {'/'.join(v)}" for k, v in sorted(pc.items())),
                 "bfloat16 only"))
    if "hf" in c:
        rows.append((f"{name}: tokens/s trainer / bare / hf, eager", _tps(c, "trainer-z1", "bare", "hf"), ""))
        rows.append((f"{name}: trainer vs hf, eager", f"{_f(c['trainer-z1']['vs_hf'])}x", ">= 1.3x"))
    else:
        rows.append((f"{name}: tokens/s trainer / bare, eager", _tps(c, "trainer-z1", "bare"), ""))
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
    cc = (comp or {}).get("contenders") or {}
    if cc:
        rows.append((f"{name}: tokens/s trainer / bare / hf, compiled",
                     _tps(cc, "trainer-z1+compile", "bare+compile", "hf"), ""))
        if "hf" in cc:
            rows.append((f"{name}: trainer vs hf, compiled (same process)",
                         f"{_f((cc.get('trainer-z1+compile') or {}).get('vs_hf'))}x", ">= 1.3x"))
        sp = comp.get("compiled_speedup") or {}
        rows.append((f"{name}: compiled / eager, trainer (same process)", f"{_f(sp.get('trainer-z1+compile'))}x",
                     ">= 1.15x"))
        if "bare+compile" in sp:
            rows.append((f"{name}: compiled / eager, bare loop", f"{_f(sp['bare+compile'])}x", ""))
        ov = (comp.get("overhead") or {}).get("trainer-z1+compile")
        rows.append((f"{name}: compiled trainer overhead over the compiled bare loop" if "bare+compile" in cc
                     else f"{name}: compiled trainer overhead over the eager bare loop", _pct(ov), ""))
    if name == "1b":
        rows.append(("1b: MFU trainer eager, compiled", f"{_mfu(c, 'trainer-z1')}, {_mfu(cc, 'trainer-z1+compile')}",
                     ">= 45%"))
    hr = (r.get("host_reads_per_step") or {}).get("trainer-z1", {})
    cs = (r.get("cuda_sync_warnings") or {}).get("trainer-z1")
    rows.append((f"{name}: host reads per step, trainer (project / deepspeed; CUDA sync warnings)",
                 f"{hr.get('project', '-')} / {hr.get('deepspeed', 0)}; {_f(cs, '{}')}", "project 1"))
    for n, p in sorted((r.get("predicted") or {}).items()):
        got = (r.get("cuda_peaks") or {}).get(n) or c[n]["peak_tensor_bytes"]
        rows.append((f"{name}: planner / measured, {n}: peak memory, step time",
                     f"{_f(p['peak_bytes'] / got)}, {_f(p['step_s'] / c[n]['step_s'])}", "within 15%, 25%"))
    return rows


def table(res: dict) -> list[tuple[str, str, str]]:
    rows = _model_rows("transformer-base", res.get("base"), res.get("compiled"))
    rows += _model_rows("1b", res.get("1b"), res.get("1b-compiled"))
    for mode, f in (res.get("precision") or {}).items():
        rows.append((f"precision {mode}: step s, peak MiB, max loss gap, param distance vs fp32",
                     f"{f['step_s']:.4f}, {f['peak_bytes'] / 2 ** 20:,.0f}, {f['max_loss_gap']:.1e}, "
                     f"{f['param_distance']:.2e}", ""))
    ev = res.get("eval")
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
    p.add_argument("--parts", default=DEFAULT_PARTS)
    p.add_argument("--work", default="/tmp/encdec-gpu-check-work", help="the parts' logs")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    res = {}
    for n in (x for x in a.parts.split(",") if x):
        res[n] = run_part(n, a.out, a.work, a.steps)
        text = render(table(res))          # after each part: a run cut short still leaves its table
        with open(os.path.join(a.out, "gpu_check_table.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def render(rows) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'check':{w}s}  {'measured':40s}  target", "-" * (w + 60)]
    lines += [f"{k:{w}s}  {v:40s}  {t}" for k, v, t in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
