"""`encdec plot RUN_DIR`: PNG curves from RUN_DIR/metrics.jsonl (schema: launcher/monitor/metrics.py).

Writes RUN_DIR/plots/loss.png (training and validation loss), throughput.png (tokens/s, and
MFU when known) and lr.png, each only when its metrics exist. Figures are drawn with the Agg
canvas directly (no pyplot, no global backend switch) and written under a temporary name, then
renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import os

from common.atomic import atomic_path
from common.errors import UserError
from launcher.monitor.metrics import METRICS_FILE

PLOTS_DIR = "plots"


class PlotError(UserError):
    """A missing or unreadable run folder / metrics file; the message is one line."""


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of RUN_DIR/metrics.jsonl, each in step order.

    A resumed run appends the steps after its last checkpoint again: when a row's step is not
    past the previous one of its kind, the earlier rows from that step on are dropped (the last
    run wins). A torn last line (a crash mid-write) is ignored; any other bad line is an error.
    """
    if not os.path.isdir(run_dir):
        raise PlotError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise PlotError(f"{path}: not found (has the run logged anything yet?)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last and i == len(lines) - 1:      # torn final line without its newline
                continue
            raise PlotError(f"{path}:{i + 1}: not a JSON object") from None
        if not isinstance(row, dict) or row.get("kind") not in rows or not isinstance(row.get("step"), int):
            raise PlotError(f"{path}:{i + 1}: expected an object with \"kind\" train|eval and an integer \"step\"")
        seq = rows[row["kind"]]
        while seq and seq[-1]["step"] >= row["step"]:
            seq.pop()
        seq.append(row)
    if not rows["train"] and not rows["eval"]:
        raise PlotError(f"{path}: empty (no metric rows)")
    return rows["train"], rows["eval"]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Draws the curves of RUN_DIR/metrics.jsonl; returns the PNG paths written (in out_dir,
    default RUN_DIR/plots)."""
    from matplotlib.figure import Figure

    train, evals = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(run_dir))
    written = []

    tx, ty = _series(train, "loss")
    ex, ey = _series(evals, "loss")
    if tx or ex:
        fig = Figure(figsize=(8, 5))
        ax = fig.add_subplot()
        if tx:
            ax.plot(tx, ty, label="train", linewidth=1)
        if ex:
            ax.plot(ex, ey, "o-", label="validation", linewidth=1.5, markersize=4)
        ax.set(xlabel="step", ylabel="loss (token cross-entropy)", title=f"{name}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, os.path.join(out_dir, "loss.png")))

    sx, sy = _series(train, "tokens_per_s")
    mx, my = _series(train, "mfu")
    if sx:
        fig = Figure(figsize=(8, 6 if mx else 4))
        ax = fig.add_subplot(2 if mx else 1, 1, 1)
        ax.plot(sx, sy, linewidth=1)
        ax.set(ylabel="tokens/s (all devices)", title=f"{name}: throughput")
        ax.grid(alpha=0.3)
        if mx:
            ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
            ax2.plot(mx, [100 * v for v in my], linewidth=1, color="tab:green")
            ax2.set(ylabel="MFU (%)")
            ax2.grid(alpha=0.3)
        fig.axes[-1].set_xlabel("step")
        written.append(_save(fig, os.path.join(out_dir, "throughput.png")))

    lx, ly = _series(train, "lr")
    if lx:
        fig = Figure(figsize=(8, 4))
        ax = fig.add_subplot()
        ax.plot(lx, ly, linewidth=1)
        ax.set(xlabel="step", ylabel="learning rate", title=f"{name}: learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        written.append(_save(fig, os.path.join(out_dir, "lr.png")))

    if not written:
        raise PlotError(f"{os.path.join(run_dir, METRICS_FILE)}: no loss, tokens_per_s or lr values to plot")
    return written
