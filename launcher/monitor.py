"""Minimal run monitor: rank 0 prints a line and appends metrics.jsonl. (Extended by the monitoring work.)"""
from __future__ import annotations

import json
import os
import time


class Monitor:
    def __init__(self, cfg, run_dir: str, is_rank0: bool):
        self.cfg, self.run_dir, self.on = cfg, run_dir, is_rank0
        self.total = cfg.train.steps

    def _write(self, row: dict) -> None:
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.on:
            return
        self._write({"kind": "train", "step": step, "time": time.time(), **metrics})
        print(f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
              f"tok/s {metrics['tokens_per_s']:.0f}", flush=True)

    def log_eval(self, step: int, metrics: dict, table_rows=None) -> None:
        if not self.on:
            return
        self._write({"kind": "eval", "step": step, "time": time.time(), **metrics})
        print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    def close(self) -> None:
        pass
