"""Screenshot of napari with the MedSAM widget and a propagated spleen, for the README.

Run under a display or Xvfb (headless):

    xvfb-run -a python scripts/screenshot.py [--out docs/images/napari_spleen.png]

It opens the shipped sample CT with the plugin's reader, docks the widget from the manifest,
boxes the spleen on its largest slice (the box comes from the reference label), segments,
propagates both ways, adds a correction click, and saves the window. It also prints the latency,
seen through the widget, of a re-prompt on a cached slice and of one propagation step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "sample_data" / "ct_spleen_msd_spleen2_crop"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "napari_spleen.png")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    os.environ.setdefault("MEDSAM_PLUGIN_INLINE", "1")  # deterministic: work runs in this thread
    os.environ.setdefault("MEDSAM_PLUGIN_AUTOSAVE", "ignore")
    # A fresh embedding cache, so "not cached" below means it: the user's disk cache would
    # otherwise hold every slice from an earlier run.
    os.environ["MEDSAM_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="medsam_screenshot_")

    import napari
    from qtpy.QtWidgets import QApplication

    from medsam_plugin.io import SliceView, read_volume

    try:  # keep napari's "PyQt5 is deprecated" toast out of the picture
        import napari._qt.qt_main_window as qt_main_window

        qt_main_window.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    viewer = napari.Viewer(title="MedSAM plugin — spleen CT")
    viewer.window.resize(1500, 900)
    [layer] = viewer.open(CASE / "image.nii.gz", plugin="medsam-plugin")
    _, widget = viewer.window.add_plugin_dock_widget("medsam-plugin", "MedSAM segmentation")
    widget.panel.device_combo.setCurrentText(args.device)

    volume = layer.metadata["medsam_volume"]
    truth_zyx = SliceView(volume).to_view(read_volume(CASE / "label.nii.gz").data_ijk) > 0
    z = int(truth_zyx.sum(axis=(1, 2)).argmax())
    rows, cols = np.nonzero(truth_zyx[z])
    widget.set_slice(z)
    widget.add_box([cols.min(), rows.min(), cols.max(), rows.max()])
    widget.add_object("spleen")

    t0 = time.perf_counter()
    widget.segment_slice()  # loads the model and encodes the slice
    first = time.perf_counter() - t0
    widget.accept()
    widget.propagate("both")
    steps = list(widget.timings["propagation_step_s"])

    # Re-prompts on the cached slice: decoding only.
    centre = np.argwhere(truth_zyx[z]).mean(axis=0)
    reprompts = []
    for k in range(5):
        widget.add_point(centre + (k - 2, 0), positive=True, z=z)
        t0 = time.perf_counter()
        widget.segment_slice()
        reprompts.append(time.perf_counter() - t0)
        widget.undo()  # drop the preview: the propagated result stays

    # Propagation again: every slice is cached now, so a step is decode-only.
    widget.timings["propagation_step_s"].clear()
    widget.propagate("both")
    cached_steps = list(widget.timings["propagation_step_s"])

    pred = np.asarray(widget.labels_layer.data) == 1
    dice = 2 * (pred & truth_zyx).sum() / (pred.sum() + truth_zyx.sum())
    print(f"Dice vs. reference spleen: {dice:.3f}")
    print(f"first prompt (model load + encode + decode): {first:.2f} s")
    print(f"re-prompt on a cached slice: median {1000 * statistics.median(reprompts):.0f} ms "
          f"(min {1000 * min(reprompts):.0f}, n={len(reprompts)})")
    if steps:
        print(f"propagation step, slice not cached (encode + decode + display): median "
              f"{statistics.median(steps):.2f} s (n={len(steps)})")
    if cached_steps:
        print(f"propagation step, slice cached (decode + display): median "
              f"{1000 * statistics.median(cached_steps):.0f} ms (n={len(cached_steps)})")

    widget.fg_layer.data = np.zeros((0, 3))  # the measurement clicks are not part of the picture
    widget.set_slice(z)
    viewer.layers.selection.active = widget.box_layer
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"saved {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
