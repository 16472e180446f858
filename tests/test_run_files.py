"""The run-folder files slurm/train.sbatch reads are the ones the Python side writes, by the same
names (launcher/run_files.py): a rename on one side fails here, not in a requeue loop at 3 am."""
import os
import re

from tests.conftest import ROOT

# written and read by the batch script itself (not by Python)
SBATCH_ONLY = {".rank_exits", "nccl_trace_rank_"}


def test_sbatch_reads_the_files_python_writes():
    from launcher import run_files
    text = open(os.path.join(ROOT, "slurm", "train.sbatch"), encoding="utf-8").read()
    paths = re.findall(r"\$\{?(?:ENCDEC_)?RUN_DIR\}?/([A-Za-z0-9_./]+)", text)
    used = {part for p in paths for part in p.split("/") if part}
    assert used, "slurm/train.sbatch names no RUN_DIR files"
    assert used - SBATCH_ONLY <= set(run_files.READ_BY_SBATCH), sorted(used - SBATCH_ONLY - set(run_files.READ_BY_SBATCH))
    for name in run_files.READ_BY_SBATCH:
        assert name in used, f"run_files.{name} is not read by slurm/train.sbatch"
