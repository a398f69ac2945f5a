#!/usr/bin/env bash
# The recipe of the shipped lesion-trained `medsam_interactive` (v2): one command, 2-core CPU, resumable.
#   bash recipes/train_lesion.sh            # fresh run (writes training_runs/lesion/)
#   bash recipes/train_lesion.sh --resume   # continue after a stop (same flags)
# Data: ../shared (lesions/ and data/); the patient split is recipes/lesion_split.json, written with
# the datalist by recipes/make_lesion_datalist.py. Starts from medsam_interactive v1; the stock
# LiteMedSAM's box answers are distilled. The slice bank is encoded through OpenVINO bf16 (4x faster
# on CPUs with AMX; inference then reads fp32 embeddings: see docs/TRAINING.md for what that costs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-training_runs/lesion/medsam_interactive.pth}
mkdir -p "$(dirname "$OUT")"
export MEDSAM_ENCODER=${MEDSAM_ENCODER:-openvino-bf16}
# The starting point: medsam_interactive v1 (organ-trained), as shipped at commit fad70c9.
V1=training_runs/medsam_interactive_v1.pth
[ -f "$V1" ] || git show fad70c9:medsam_plugin/weights/medsam_interactive.pth > "$V1"
exec .venv/bin/medsam-plugin finetune --objective interactive \
  --datalist recipes/lesion_datalist.json --data-root "${DATA_ROOT:-../shared}" \
  --model "${BASE:-$V1}" --teacher-model lite_medsam --distill-weight 0.25 \
  --out "$OUT" --steps "${STEPS:-500}" --batch-size 8 --lr 1e-4 --max-rounds 4 \
  --chain-share 0.4 --chain-length 4 --slices-per-variant 16 \
  --val-every 50 --bf16 auto --threads "${THREADS:-2}" --stop-policy lesion-interactive \
  --max-minutes "${MAX_MINUTES:-170}" --json "${OUT%.pth}.history.json" "$@"
