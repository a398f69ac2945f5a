#!/usr/bin/env bash
# The recipe of the shipped `medsam_interactive` model: one command, 2-core CPU, resumable.
#   bash recipes/train_interactive.sh            # fresh run
#   bash recipes/train_interactive.sh --resume   # continue after a stop (same flags)
# Data: ../shared/data (see recipes/interactive_datalist.json for which cases train and validate).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-training_runs/medsam_interactive/medsam_interactive.pth}
mkdir -p "$(dirname "$OUT")"
exec .venv/bin/medsam-plugin finetune --objective interactive \
  --datalist recipes/interactive_datalist.json --data-root "${DATA_ROOT:-../shared/data}" \
  --out "$OUT" --steps "${STEPS:-520}" --batch-size 8 --lr 1e-4 --max-rounds 6 \
  --variants 4 --slices-per-variant 16 --val-every 60 --bf16 auto --threads "${THREADS:-1}" \
  --max-minutes "${MAX_MINUTES:-170}" --json "${OUT%.pth}.history.json" "$@"
