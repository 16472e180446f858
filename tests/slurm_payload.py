"""A tiny stand-in for the trainer under slurm/train.sbatch (ENCDEC_PYTHON points at a wrapper).

It receives the trainer's command line (`-m launcher.cli train CONFIG out_dir=... overrides`),
reads its rank from Slurm through launcher.dist_env, joins a gloo group across the emulated
nodes and prints one JSON line per rank:
    PAYLOAD {"rank", "world", "local_rank", "node", "nodename", "sum", "argv"}
With PAYLOAD_LOOP=1 it then keeps doing all_reduces (for tests that kill one rank).
"""
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from launcher.dist_env import export_torch_env, read_env


def main() -> int:
    env = read_env()
    assert env.launcher == "slurm", f"expected the Slurm launcher, got {env}"
    export_torch_env(env)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    print("PAYLOAD " + json.dumps({
        "rank": env.rank, "world": env.world_size, "local_rank": env.local_rank, "node": env.node_rank,
        "nodename": os.environ.get("SLURMD_NODENAME"), "sum": t.item(), "argv": sys.argv[1:],
        "master": f"{env.master_addr}:{env.master_port}"}), flush=True)
    if os.environ.get("PAYLOAD_LOOP") == "1":
        print(f"PAYLOAD_LOOP rank {env.rank} pid {os.getpid()}", flush=True)
        while True:                  # a peer's death leaves this rank blocked in all_reduce
            dist.all_reduce(t)
            time.sleep(0.05)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
