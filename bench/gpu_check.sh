#!/usr/bin/env bash
# The performance targets that need a GPU, in one short run (one H100/H200; a few minutes):
#   1. configs/transformer-base.yaml in bf16: the trainer's whole step vs the stock Hugging Face
#      class at the same shape and batch (target: >= 1.3x its tokens/s), eager and compiled
#   2. configs/1b.yaml on one GPU (tp 1, ZeRO 1, bf16): MFU (target: >= 45%), eager and compiled
# Each part prints its own figures; a failing part does not stop the others. Output also goes to
# $OUT/gpu_check.log when OUT is set.
#
#   bash bench/gpu_check.sh                   # all parts
#   PARTS=2 STEPS=8 bash bench/gpu_check.sh    # only the 1b MFU part
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-12}
PARTS=${PARTS:-"1 2"}
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-/dev/null}

run() {   # run TITLE CMD...: one part, timed, its status reported
  local title=$1; shift
  echo "=== $title: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v -e '\[WARNING\]' -e '^\[W' | tee -a "$LOG"
  echo "=== $title: status ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$LOG"

for part in $PARTS; do
  case $part in
    1)
      run "transformer-base bf16 vs hf" "$PY" bench/step.py --config configs/transformer-base.yaml \
        --precision bf16 --steps "$STEPS" parallel.zero_stage=1
      run "transformer-base bf16 vs hf, compiled" "$PY" bench/step.py --config configs/transformer-base.yaml \
        --precision bf16 --steps "$STEPS" parallel.zero_stage=1 train.compile=true ;;
    2)
      run "1b one GPU, MFU" "$PY" bench/step.py --config configs/1b.yaml --precision bf16 --skip-hf \
        --steps "$STEPS" parallel.tp=1 parallel.zero_stage=1 parallel.activation_checkpointing=false \
        train.micro_batch_size=16
      run "1b one GPU, MFU, compiled" "$PY" bench/step.py --config configs/1b.yaml --precision bf16 --skip-hf \
        --steps "$STEPS" parallel.tp=1 parallel.zero_stage=1 parallel.activation_checkpointing=false \
        train.micro_batch_size=16 train.compile=true ;;
    *) echo "unknown part $part (1 or 2)" >&2 ;;
  esac
done
