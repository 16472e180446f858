"""Entry point of one training rank: `python -m launcher.train CONFIG [key=value ...]`.

Started by `encdec train --nproc N` (torchrun on one machine), by torchrun directly, or by srun.
"""
from __future__ import annotations

import sys

from data.mixture import check_data
from launcher.config import load_config, validate_layout
from launcher.dist_env import export_torch_env, read_env
from launcher.signals import StopSignal


def _single_process_env(env):
    """A one-process group on a free local port."""
    import dataclasses
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dataclasses.replace(env, master_port=port)


def run(config_path: str, overrides: list[str]) -> dict:
    stop = StopSignal().install()                  # before the slow imports: a signal now is kept
    cfg = load_config(config_path, overrides)
    env = read_env()
    validate_layout(cfg, env.world_size)          # before any process group waits
    check_data(cfg.data)                           # every source resolves, or one clear error now
    export_torch_env(env if env.launcher != "single" else _single_process_env(env))
    from launcher.trainer import Trainer
    trainer = Trainer(cfg, env, stop=stop)
    return trainer.train()


if __name__ == "__main__":
    from launcher.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
