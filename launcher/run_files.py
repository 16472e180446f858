"""The files of a run folder (RUN_DIR = out_dir), by name: the trainer writes them, and
slurm/train.sbatch reads the ones marked (sbatch) by the same names (tests/test_run_files.py holds
the two together).

    config.yaml           the effective config (vocabulary filled in)
    metrics.jsonl         one JSON row per logged step / evaluation            (sbatch: progress)
    checkpoints/          step folders, and `latest` naming the newest complete one   (sbatch: progress)
    run.lock              held by rank 0 while a run uses the folder
    requeue_requested     a signal stopped the run after saving a checkpoint   (sbatch: requeue)
    user_error            the one-line user error the run ended with           (sbatch: do not restart)
"""
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOCK = "run.lock"
REQUEUE_REQUESTED = "requeue_requested"
USER_ERROR = "user_error"
READ_BY_SBATCH = (METRICS, CHECKPOINTS, LATEST, REQUEUE_REQUESTED, USER_ERROR)
