#!/usr/bin/env bash
# Ship a trained interactive checkpoint as the packaged `medsam_interactive` model: copy it into
# medsam_plugin/weights/ and record its sha256, which every load by name then verifies.
#   bash recipes/ship_interactive.sh [CHECKPOINT]   (default: the recipe's output)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-training_runs/medsam_interactive/medsam_interactive.pth}
DEST=medsam_plugin/weights/medsam_interactive.pth
cp "$SRC" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
chmod 644 "$DEST"
(cd medsam_plugin/weights && sha256sum medsam_interactive.pth > SHA256SUMS)
cat medsam_plugin/weights/SHA256SUMS
