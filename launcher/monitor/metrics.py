"""Run monitoring on rank 0: metrics.jsonl in the run folder, wandb, and a console progress line.

RUN_DIR/metrics.jsonl: one JSON object per line, appended (a resumed or requeued run appends
to the same file), flushed after every line, written by rank 0 only.

    every row   "kind": "train" | "eval", "step": optimizer steps completed (int),
                "time": unix seconds when the row was written
    train rows  loss                     mean token cross-entropy over the logged window
                lr                       learning rate at this step
                grad_norm                global gradient norm before clipping
                tokens_per_s             target+source tokens (as the trainer counts them) per second, all ranks
                tokens_per_s_per_device  tokens_per_s / number of devices
                samples_per_s            samples per second, all ranks
                mfu                      model FLOPs utilisation in [0, 1] (flops.py); null if no peak known
                step_time_s              mean wall time of one optimizer step in the window
                data_wait_frac           fraction of that time spent waiting for the data loader
                peak_mem_gb              peak accelerator memory of rank 0 (GiB); 0 on CPU
                skipped_samples          bad samples skipped so far
    eval rows   loss (validation mean token cross-entropy), ppl, and e.g. bleu, chrf

Other numeric keys the trainer passes are written as they are. A resumed run re-logs the steps
after its last checkpoint, so a step can appear twice for one kind: the last row wins (this is
what plot.read_metrics does). Eval sample tables go to RUN_DIR/eval_samples.jsonl as
{"step": ..., "rows": [{column: value, ...}, ...]}.

wandb: keys are "train/<key>" and "eval/<key>" against the x-axis "step" (a metric of its own,
so a resumed run re-logging earlier steps is not dropped). The mode is cfg.wandb.mode unless
the WANDB_MODE environment variable is set (it wins). The run id is generated once and kept in
RUN_DIR/wandb_run_id, so a resumed or requeued job continues the same wandb run. The effective
config is logged with secrets removed (see scrub); API keys never reach a log, config or file.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
import sys
import time
from typing import Any

from common.atomic import atomic_write
from common.errors import UserError
from launcher import run_files
from launcher.config import RunConfig, config_to_dict

METRICS_FILE = run_files.METRICS
SAMPLES_FILE = "eval_samples.jsonl"
RUN_ID_FILE = "wandb_run_id"
REDACTED = "***"

# Key names whose values are dropped (not "token" alone: eos_token, max_tokens are not secrets).
_SECRET_NAME = re.compile(r"(^|_)((api|wandb|secret|private|access)_?key|secret|passw(or)?d|(access|auth|hf|wandb)_?token"
                          r"|credentials?)($|_)|^token$", re.I)
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
_SECRET_TEXT = [
    re.compile(r"\bwandb_v\d+_[A-Za-z0-9_]+"),          # wandb API keys, new format
    re.compile(r"\blocal-[0-9a-f]{40}\b"),               # wandb local-server keys
    re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])"),  # wandb API keys, classic 40 hex
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),                # Hugging Face tokens
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                 # AWS access key ids
    re.compile(r"(?i)(?<=bearer )[^\s'\"]+"),            # Authorization: Bearer <token>
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),      # user:password@ in URLs
]
_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


# ----------------------------------------------------------------------------- secrets

def secret_values(environ=None) -> list[str]:
    """Values of environment variables whose names look secret (WANDB_API_KEY, HF_TOKEN, ...)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}, key=len, reverse=True)


def scrub(obj: Any, secret_vals: list[str] | None = None) -> Any:
    """A copy of obj (dicts, lists, strings, numbers) with anything secret-looking replaced by ***.

    Removes: values under secret-looking keys (api_key, token, password, ...), any occurrence of
    a secret environment variable's value, and text shaped like an API key, a bearer token or
    URL credentials. A bare 40-hex string is treated as a (wandb) key too.
    """
    vals = secret_values() if secret_vals is None else secret_vals
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) and obj[k] not in (None, "")
                    else scrub(v, vals)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, vals) for v in obj)
    if isinstance(obj, str):
        for v in vals:
            obj = obj.replace(v, REDACTED)
        for pat in _SECRET_TEXT:
            obj = pat.sub(REDACTED, obj)
        return obj
    return obj


# ----------------------------------------------------------------------------- helpers

def resolve_mode(cfg_mode: str, environ=None) -> str:
    """online | offline | disabled: WANDB_MODE if set (it wins), else the config's wandb.mode."""
    environ = os.environ if environ is None else environ
    env = environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _MODES:
            raise UserError(f"WANDB_MODE={env!r} is not one of online, offline, disabled")
        return _MODES[env]
    if cfg_mode not in _MODES:
        raise UserError(f"config key 'wandb.mode': must be online, offline or disabled, got {cfg_mode!r}")
    return _MODES[cfg_mode]


def run_id(run_dir: str) -> str:
    """The wandb run id of this run folder: read from RUN_DIR/wandb_run_id, or created there once."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rid = f.read().strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid):
            raise UserError(f"{path}: not a valid wandb run id: {rid[:80]!r}")
        return rid
    alphabet = string.ascii_lowercase + string.digits
    rid = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write(path, rid + "\n")
    return rid


def _plain(v: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers; NaN and infinities -> None (metrics.jsonl is strict
    JSON: no NaN/Infinity tokens); everything else unchanged."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(v: Any) -> Any:
    """NaN / infinities anywhere in a row -> None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _duration(s: float) -> str:
    if s is None or not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"


def progress_line(step: int, total_steps: int, metrics: dict, eta_s: float | None = None) -> str:
    """One console line: 'step 120/1000 (12.0%) | loss 3.4521 | lr 3.00e-04 | 12,345 tok/s | ETA 1h02m'."""
    parts = [f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
    if metrics.get("loss") is not None:
        parts.append(f"loss {metrics['loss']:.4f}")
    if metrics.get("lr") is not None:
        parts.append(f"lr {metrics['lr']:.2e}")
    if metrics.get("tokens_per_s") is not None:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- the monitor

class Monitor:
    """Rank 0 writes metrics.jsonl, logs to wandb and prints progress; other ranks do nothing.

    cfg: the effective RunConfig (logged to wandb as the run config, secrets removed).
    run_dir: the run folder (metrics.jsonl, wandb_run_id; wandb's own files go to
      $WANDB_DIR if set, else RUN_DIR/wandb).
    is_rank0: global rank 0; every other rank gets a no-op monitor (no files, no wandb).
    extra_config: more values for the wandb config, e.g. {"world_size": 8, "n_params": ...}.
    console: print progress_line on every log() to `stream`.
    """

    def __init__(self, cfg: RunConfig, run_dir: str, is_rank0: bool, extra_config: dict | None = None,
                 console: bool = True, stream=None):
        self.enabled = bool(is_rank0)
        self.run_dir = run_dir
        self.total_steps = cfg.train.steps
        self.console = console
        self.stream = stream
        self.wandb_run = None
        self._file = None
        self._t0 = self._step0 = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._secrets = secret_values()
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8")
        self.mode = resolve_mode(cfg.wandb.mode)
        if self.mode != "disabled":
            self._init_wandb(cfg, extra_config)

    def _init_wandb(self, cfg: RunConfig, extra_config: dict | None) -> None:
        import wandb
        config = config_to_dict(cfg)
        if extra_config:
            config["run_info"] = dict(extra_config)
        config = scrub(config, self._secrets)
        w = cfg.wandb
        try:
            self.wandb_run = wandb.init(
                mode=self.mode, project=w.project or None, entity=w.entity or None, name=w.name or cfg.name,
                group=w.group or None, tags=list(w.tags) or None, config=config, id=run_id(self.run_dir),
                resume="allow", dir=None if os.environ.get("WANDB_DIR") else self.run_dir)
        except Exception as e:  # noqa: BLE001 - one clear line instead of a wandb traceback
            msg = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, self._secrets)
            raise RuntimeError(f"wandb.init failed in mode {self.mode} (set wandb.mode=offline or "
                               f"WANDB_MODE=offline to log locally): {msg}") from None
        self.wandb_run.define_metric("step")
        self.wandb_run.define_metric("train/*", step_metric="step")
        self.wandb_run.define_metric("eval/*", step_metric="step")

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(_finite(row), default=str, allow_nan=False) + "\n")
        self._file.flush()

    def _clean(self, metrics: dict) -> dict:
        out = {}
        for k, v in metrics.items():
            v = _plain(v)
            out[k] = scrub(v, self._secrets) if isinstance(v, str) else v
        return out

    def eta(self, step: int, step_time_s: float | None = None) -> float | None:
        """Seconds left: from wall time per step since this monitor's first log (includes evals
        and checkpoints), or from step_time_s until two logs exist."""
        now = time.time()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        remaining = max(self.total_steps - step, 0)
        if step > self._step0:
            return remaining * (now - self._t0) / (step - self._step0)
        return remaining * step_time_s if step_time_s else None

    def log(self, step: int, metrics: dict) -> None:
        """A training row (schema above) for optimizer step `step`."""
        if not self.enabled:
            return
        metrics = self._clean(metrics)
        self._write({"kind": "train", "step": int(step), "time": time.time(), **metrics})
        if self.wandb_run is not None:
            self._wandb(self.wandb_run.log, {"step": int(step), **{f"train/{k}": v for k, v in metrics.items()
                                                                 if v is None or isinstance(v, (int, float))}})
        eta = self.eta(step, metrics.get("step_time_s"))
        if self.console:
            print(progress_line(step, self.total_steps, metrics, eta), file=self.stream or sys.stdout, flush=True)

    def log_eval(self, step: int, metrics: dict, table_rows: list[dict] | None = None) -> None:
        """An evaluation row; table_rows (e.g. [{"source", "reference", "hypothesis"}]) become a
        wandb table and a line of eval_samples.jsonl."""
        if not self.enabled:
            return
        metrics = self._clean(metrics)
        self._write({"kind": "eval", "step": int(step), "time": time.time(), **metrics})
        rows = scrub([dict(r) for r in table_rows], self._secrets) if table_rows else None
        if rows:
            path = os.path.join(self.run_dir, SAMPLES_FILE)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": int(step), "rows": rows}) + "\n")
        if self.wandb_run is not None:
            data = {"step": int(step), **{f"eval/{k}": v for k, v in metrics.items()
                                          if v is None or isinstance(v, (int, float))}}
            if rows:
                import wandb
                columns = list(rows[0])
                data["eval/samples"] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self._wandb(self.wandb_run.log, data)
        if self.console:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool))
            print(f"eval @ step {step}: {shown}", file=self.stream or sys.stdout, flush=True)

    def close(self, exit_code: int = 0) -> None:
        """Flushes and closes the file and finishes the wandb run (exit_code != 0 marks it failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self._wandb(self.wandb_run.finish, exit_code=exit_code)
            self.wandb_run = None

    def _wandb(self, fn, *args, **kw) -> None:
        """A wandb call; if wandb's helper process is gone (a TERM sent to every process of a Slurm
        step reaches it too), wandb is dropped for the rest of this run with one line: metrics.jsonl
        goes on, and the next start resumes the same wandb run (its id is in the run folder)."""
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - never lose a checkpoint to the metrics side channel
            print(f"wandb: {type(e).__name__}: {e}; logging to metrics.jsonl only until the next start",
                  file=sys.stderr, flush=True)
            self.wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exit_code=0 if exc_type is None else 1)
        return False
