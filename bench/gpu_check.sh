#!/usr/bin/env bash
# The performance targets that need a GPU, in one prepared run (one H100/H200; under 8 minutes, each
# part under its own timeout; bench/gpu_check.py says what each part runs), ending with one table:
#   the first step's matmul dtypes (bf16 means bf16), trainer / bare loop / stock HF tokens/s and
#   ratios (eager and compiled; target trainer >= 1.3x HF, compiled >= 1.15x eager), the trainer's
#   overhead over the bare loop at ZeRO 0-3 (target <= 10% at 0-2), configs/1b.yaml MFU on one GPU
#   (target >= 45%), host reads per step, eval tokens/s, the planner's memory and step time vs measured.
# Logs, JSON and the table go to $OUT (default /tmp/encdec-gpu-check).
#
#   bash bench/gpu_check.sh                       # all parts
#   PARTS=1b STEPS=8 bash bench/gpu_check.sh      # one part
# On the lent device machine (no registry there): PY=python3 with the wheels of
# ../shared/hooks/device-wheels.sh on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
exec "$PY" bench/gpu_check.py ${PARTS:+--parts "$PARTS"} --steps "${STEPS:-10}" ${OUT:+--out "$OUT"}
