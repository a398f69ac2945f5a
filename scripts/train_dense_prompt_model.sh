#!/usr/bin/env bash
# One-command recipe for the shipped dense-prompt propagation model (docs/TRAINING.md).
#
#   scripts/train_dense_prompt_model.sh [OUT_DIR]
#
# Trains LiteMedSAM's prompt encoder + mask decoder (image encoder frozen, embeddings cached) on
# the shared cases whose licences allow shipping: MSD spleen_2 (CC-BY-SA-4.0) and the two
# TotalSegmentator examples (Apache-2.0; larger organs only). CPU, about 25 minutes on 2 cores.
# Env: DATA_DIR (default ../shared/data next to the repo), PYTHON (default .venv/bin/python).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-$REPO/runs/dense_prompt}"
DATA_DIR="${DATA_DIR:-$(cd "$REPO/.." && pwd)/shared/data}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$OUT_DIR"

"$PYTHON" - "$DATA_DIR" "$OUT_DIR/dataset.json" <<'PY'
import json, sys
data, out = sys.argv[1], sys.argv[2]
manifest = {c["id"]: c for c in json.load(open(f"{data}/manifest.json"))}
# label values to train on: the organs large enough to propagate through several slices
pick = {"ct_spleen_msd_spleen2_crop": [1],                        # spleen
        "ct_abdomen_totalseg_sm": [1, 2, 3, 5, 6, 86, 87],         # spleen, kidneys, liver, stomach, back muscles
        "mr_abdomen_totalseg_sm": [1, 2, 3, 5, 6, 46, 47]}         # the same organs in MR
items = [{"name": case, "image": f"{data}/{case}/image.nii.gz", "label": f"{data}/{case}/label.nii.gz",
          "modality": manifest[case]["modality"], "labels": {"0": "background", **manifest[case]["label_names"]},
          "objects": objs} for case, objs in pick.items()]
json.dump({"name": "medsam_plugin dense-prompt propagation", "training": items}, open(out, "w"), indent=1)
print(f"wrote {out}")
PY

exec "$PYTHON" -m medsam_plugin.cli finetune \
  --datalist "$OUT_DIR/dataset.json" --out "$OUT_DIR/lite_medsam_dense.pth" \
  --train decoder --epochs 30 --samples-per-epoch 128 --batch-size 8 --lr 2e-4 --patience 4 \
  --min-area 20 --max-minutes 24 --seed 0 --fp16-weights \
  --cache-dir "$OUT_DIR/embeddings" --json "$OUT_DIR/history.json" "${@:2}"
