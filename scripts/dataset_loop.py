"""The dataset loop as a new user runs it, timed: five scans annotated in napari, a fine-tune started
from the Dataset panel, and the saved prompts replayed by ``medsam-plugin segment --datalist``.

    xvfb-run -a python scripts/dataset_loop.py --folder /tmp/loop [--screens DIR] [--steps 40] [--slices 8]

The folder is built from copies of the shipped sample data and, when present, the shared
TotalSegmentator MR case (Apache-2.0): the spleen CT, the abdomen CT, two crops of them and the
abdomen MR, each cut to --slices slices round the spleen (0: whole). The "user" draws the bounding
box of the reference spleen on its largest slice, then presses S, P and Shift+S, and Shift+N for
the next case: real key presses on the canvas. Screenshots go to --screens. --cache names the
cache root (a fresh one by default: the first run converts the encoder to OpenVINO).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SHARED = REPO.parent / "shared" / "data"


def _crop(src: Path, dst: Path, z0: int, z1: int) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, z0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, z0:z1], affine, img.header), str(dst))


def _spleen_span(label: Path) -> tuple[int, int]:
    import nibabel as nib

    zs = np.flatnonzero((np.asarray(nib.load(str(label)).dataobj) == 1).sum(axis=(0, 1)))
    return int(zs.min()), int(zs.max())


def build_folder(folder: Path, slices: int) -> dict[str, Path]:
    """Five scans (and, kept apart, their reference labels for the scripted user's boxes)."""
    truth_dir = folder.parent / (folder.name + "_reference")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(truth_dir, ignore_errors=True)
    folder.mkdir(parents=True)
    truth_dir.mkdir(parents=True)
    spleen, abdomen = SAMPLE / "ct_spleen_msd_spleen2_crop", SAMPLE / "ct_abdomen_totalseg_sm"
    # (source, offset of the crop from the spleen's first slice): different crops of one scan
    plan = {"spleen_ct": (spleen, 0), "abdomen_ct": (abdomen, 0), "spleen_ct_upper": (spleen, 6),
            "abdomen_ct_upper": (abdomen, 3)}
    if (SHARED / "mr_abdomen_totalseg_sm").is_dir():
        plan["abdomen_mr"] = (SHARED / "mr_abdomen_totalseg_sm", 0)
    else:
        plan["spleen_ct_lower"] = (spleen, -2)
    for name, (src, offset) in plan.items():
        import nibabel as nib

        n = nib.load(str(src / "image.nii.gz")).shape[2]
        lo, hi = _spleen_span(src / "label.nii.gz")
        if slices:
            z0 = max(0, min(lo + offset, n - slices))
            crop = (z0, z0 + slices)
        else:
            crop = (0, n)
        for kind, out in (("image", folder / f"{name}.nii.gz"), ("label", truth_dir / f"{name}.nii.gz")):
            _crop(src / f"{kind}.nii.gz", out, *crop)
    return {name: truth_dir / f"{name}.nii.gz" for name in plan}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "medsam_dataset_loop")
    parser.add_argument("--screens", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--tiny-training", action="store_true",
                        help="train on 2 slices per case and window, axial only (a machine without CPU to spare)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MEDSAM_PLUGIN_AUTOSAVE", "ignore")
    os.environ["MEDSAM_PLUGIN_CACHE"] = str(args.cache) if args.cache else tempfile.mkdtemp(prefix="medsam_loop_")
    times: dict[str, float] = {}
    truths = build_folder(args.folder, args.slices)

    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from medsam_plugin.io import read_labels

    def pump(seconds=0.3):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    def press(key, modifier=Qt.NoModifier):
        QTest.keyClick(viewer.window._qt_viewer.canvas.native, key, modifier)
        QApplication.processEvents()

    def shot(name):
        if args.screens:
            args.screens.mkdir(parents=True, exist_ok=True)
            pump(0.5)
            viewer.screenshot(str(args.screens / name), canvas_only=False)
            print(f"screenshot {args.screens / name}")

    viewer = napari.Viewer(title="MedSAM plugin — dataset loop")
    viewer.window.resize(1600, 1000)
    _, medsam = viewer.window.add_plugin_dock_widget("medsam-plugin", "MedSAM segmentation")
    _, panel = viewer.window.add_plugin_dock_widget("medsam-plugin", "Dataset")
    assert panel.medsam is medsam
    t0 = time.perf_counter()
    panel.open_folder(args.folder)
    times["open the folder"] = time.perf_counter() - t0
    shot("dataset_01_opened.png")

    def wait_idle():
        while medsam._busy():
            pump(0.05)

    per_case = []
    for k in range(len(panel.dataset.cases)):
        t_case = time.perf_counter()
        t0 = time.perf_counter()
        press(Qt.Key_N, Qt.ShiftModifier)  # next case to do
        pump(0.2)
        t_open = time.perf_counter() - t0
        name = panel.current
        session = medsam.session
        truth_all = session.view.to_view(read_labels(truths[name], session.volume))
        objects = [(1, "spleen")]
        t_seg = t_prop = 0.0
        for value, object_name in objects:
            truth = truth_all == value
            if object_name == "spleen" and 1 in session.labels.objects:
                medsam.select_object(1)
            else:
                medsam.add_object(object_name)
            z = int(truth.sum(axis=(1, 2)).argmax())
            rows, cols = np.nonzero(truth[z])
            medsam.set_slice(z)
            medsam.add_box([cols.min(), rows.min(), cols.max(), rows.max()], z=z)
            viewer.layers.selection.active = medsam.fg_layer
            t0 = time.perf_counter()
            press(Qt.Key_S)
            wait_idle()
            t_seg += time.perf_counter() - t0
            t0 = time.perf_counter()
            press(Qt.Key_P)
            wait_idle()
            t_prop += time.perf_counter() - t0
        if k == 0:
            shot("dataset_02_first_case_segmented.png")
        t0 = time.perf_counter()
        press(Qt.Key_S, Qt.ShiftModifier)  # save the case
        t_save = time.perf_counter() - t0
        labels = session.labels_ijk()
        dice = {}
        for value, object_name in objects:
            truth_ijk = read_labels(truths[name], session.volume) == value
            pred = labels == [v for v, n in session.labels.names().items() if n == object_name][0]
            dice[object_name] = round(float(2 * (pred & truth_ijk).sum() / (pred.sum() + truth_ijk.sum())), 3)
        per_case.append({"case": name, "open_s": round(t_open, 2), "segment_s": round(t_seg, 2),
                         "propagate_s": round(t_prop, 2), "save_s": round(t_save, 2),
                         "case_total_s": round(time.perf_counter() - t_case, 2), "dice_vs_reference": dice})
        print(json.dumps(per_case[-1]))
    shot("dataset_03_all_done.png")
    press(Qt.Key_B, Qt.ShiftModifier)  # back one case: its saved work comes back
    pump(0.5)
    shot("dataset_04_reopened_case.png")
    restored = panel.current

    # fine-tune from the panel, in the background
    if args.tiny_training:
        panel.job_overrides = lambda: {"extra": ("--views", "axial", "--variants", "0", "--slices-per-variant", "2")}
    panel.steps_spin.setValue(args.steps)
    panel.minutes_spin.setValue(args.minutes)
    t0 = time.perf_counter()
    QTest.mouseClick(panel.train_button, Qt.LeftButton)
    shot_taken = False
    while panel.train_task is not None and panel.train_task.running:
        pump(0.5)
        if not shot_taken and panel.train_bar.value() >= 1:
            shot("dataset_05_training.png")
            shot_taken = True
    times["fine-tune from the panel"] = time.perf_counter() - t0
    print("training:", panel.train_label.text())
    shot("dataset_06_trained.png")
    if panel.outcome is not None:
        QTest.mouseClick(panel.use_model_button, Qt.LeftButton)
        pump(0.3)
        print("MedSAM widget model now:", medsam.model_name())
    viewer.close()

    # the batch command replays every saved prompts file
    datalist = args.folder / "dataset.json"
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(str(datalist), True, "training", base_dir=str(args.folder))
    print(f"MONAI load_decathlon_datalist: {len(items)} training cases, all files exist: "
          f"{all(Path(i['image']).exists() and Path(i['label']).exists() for i in items)}")
    out_dir = args.folder.parent / (args.folder.name + "_replayed")
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "medsam_plugin.cli", "segment", "--datalist", str(datalist),
                          "--out-dir", str(out_dir)])
    times["batch replay (segment --datalist)"] = time.perf_counter() - t0
    from medsam_plugin.io import read_volume

    same = {}
    for case in per_case:
        vol = read_volume(args.folder / f"{case['case']}.nii.gz")
        a = read_labels(args.folder / "labelsTr" / f"{case['case']}.nii.gz", vol)
        b = read_labels(out_dir / f"{case['case']}.nii.gz", vol)
        same[case["case"]] = {"identical": bool(np.array_equal(a, b)), "voxels_differing": int((a != b).sum()),
                              "labelled_voxels": int((a > 0).sum())}
    print(json.dumps({"batch_exit": rc, "replay_vs_saved": same}, indent=1))
    print(json.dumps({"times_s": {k: round(v, 1) for k, v in times.items()}, "cases": per_case,
                      "reopened": restored}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
