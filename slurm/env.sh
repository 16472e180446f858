# Site and NCCL settings for slurm/train.sbatch. Sourced on the first node before `srun`;
# srun exports the resulting environment to every task. Edit this file (not train.sbatch)
# for your cluster: modules, the Python environment, network interfaces.

# --- software environment (examples; uncomment what your site needs)
# module load cuda/12.4 nccl
# source /path/to/encdec/.venv/bin/activate     # or set ENCDEC_PYTHON=/path/to/python

# --- CPU threads per rank: the cores Slurm gave each task
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# --- failure handling: a stuck or dead peer ends the job instead of hanging it.
# With async error handling, a collective that exceeds train.collective_timeout_s aborts the
# process (non-zero exit), and srun --kill-on-bad-exit then ends every other rank.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Flight recorder: each rank keeps its last N collectives (op, sizes, process group, state) and,
# when a collective times out, dumps them (one file per rank) so the rank that never joined can be
# found (`python -m torch.distributed.flight_recorder.fr_trace DIR` reads them).
# (names of recent torch, 2.13 here: TORCH_FR_*; the older TORCH_NCCL_TRACE_BUFFER_SIZE and
# TORCH_NCCL_DEBUG_INFO_TEMP_FILE still work but print a deprecation warning on every rank)
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-${ENCDEC_RUN_DIR:-/tmp}/nccl_trace_rank_}
# NCCL's own watchdog thread: a process group whose watchdog is stuck this long is aborted
export TORCH_NCCL_ENABLE_MONITORING=${TORCH_NCCL_ENABLE_MONITORING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}
# The trainer's hang watchdog (train.hang_timeout_s, default 300 s) fires first, naming the rank,
# step and phase; the collective timeout (train.collective_timeout_s, 600 s) is the backstop.
export PYTHONFAULTHANDLER=1                  # Python stack traces on fatal signals
export PYTHONUNBUFFERED=1                    # log lines reach the job log as they are written

# --- NCCL
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Tensor parallelism issues its collectives in order on one stream; this keeps kernels queued
# in that order on Hopper/Ampere (the usual setting for Megatron-style TP).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Site specific: the interface for bootstrap/socket traffic and the InfiniBand HCAs.
# export NCCL_SOCKET_IFNAME=ib0                # or eth0, bond0, ... (`ip -br addr` on a node)
# export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
# export NCCL_IB_HCA=mlx5
# export NCCL_NET_GDR_LEVEL=PHB
# On clusters without InfiniBand (or to debug): export NCCL_IB_DISABLE=1

# --- Weights & Biases: the config's wandb.mode decides; WANDB_MODE (online|offline|disabled)
# set here or at submission overrides it. Compute nodes without internet: offline, then
# `wandb sync RUN_DIR/wandb/offline-run-*` from a login node.
# export WANDB_MODE=offline
