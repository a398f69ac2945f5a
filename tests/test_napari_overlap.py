"""Issue 11, item 4: the overlap rule is the user's choice, and what a rule withholds is always said.

BraTS 2013 pat0001 as in the report: the "oedema" object is made to cover the whole tumour (as an
over-reaching propagation did), then the enhancing tumour is segmented. A fake predictor answers
each object with its region, so the rule, not the model, decides what each object gets.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import require_shared_data  # noqa: E402
from fakes import FakePredictor  # noqa: E402
from medsam_plugin.io import SliceView, read_volume  # noqa: E402

pytestmark = pytest.mark.gui

CASE = "mr_brain_tumour_brats_2013_pat0001_1"


class Fake(FakePredictor):
    loaded = None
    spec = None


@pytest.fixture(scope="module")
def brats():
    case = require_shared_data() / CASE
    volume = read_volume(case / "image.nii.gz")
    label = SliceView(volume).to_view(read_volume(case / "label.nii.gz").data_ijk)
    return case, volume, label


def segment(w, qtbot, truth, name):
    from qtpy.QtCore import Qt

    w.session._predictor.truth = truth
    w.add_object(name)
    z = int(truth.sum(axis=(1, 2)).argmax())
    rows, cols = np.nonzero(truth[z])
    w.set_slice(z)
    w.add_box([cols.min() - 1, rows.min() - 1, cols.max() + 1, rows.max() + 1])
    canvas = w.viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key_S)
    qtbot.keyClick(canvas, Qt.Key_P)
    return w.current_label


@pytest.mark.parametrize("mode", ["overwrite none", "overwrite all", "allow overlap"])
def test_each_overlap_mode(make_napari_viewer, monkeypatch, tmp_path, qtbot, brats, mode):
    from medsam_plugin.engine.propagation import StopPolicy, StopRules
    from medsam_plugin.napari._widget import MedSAMWidget

    case, volume, label = brats
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(case / "image.nii.gz", plugin="medsam-plugin")
    w = MedSAMWidget(viewer, autosave_policy="ignore", inline=True, embedding_cache=False)
    viewer.window.add_dock_widget(w)
    w.session._predictor = Fake(label > 0)
    w.session.stop_rules = StopRules(min_iou_with_previous=None, policy=StopPolicy.off())
    w.overlap_combo.setCurrentText(mode)
    assert w.session.overlap == {"overwrite none": "none", "overwrite all": "all", "allow overlap": "allow"}[mode]

    whole = label > 0
    oedema = segment(w, qtbot, whole, "oedema")
    assert (w.session.labels.array == oedema).sum() == whole.sum()
    enhancing_truth = label == 4
    enhancing = segment(w, qtbot, enhancing_truth, "enhancing")
    got = w.session.labels.array == enhancing
    status = w.status.text()
    n = int(enhancing_truth.sum())
    if mode == "overwrite none":  # today's rule: the first claim wins, and the status says by how much
        assert not got.any()
        assert f"{n:,} voxels were withheld" in status and "'oedema'" in status
    elif mode == "overwrite all":
        assert got.sum() == n and "withheld" not in status
        assert (w.session.labels.array == oedema).sum() == whole.sum() - n
    else:  # allow overlap: the map keeps the first claim, the object keeps its whole extent
        assert not got.any() and w.session.object_mask(enhancing).sum() == n
        assert f"{n:,} voxels overlap 'oedema'" in status
        overlaps = viewer.layers["MedSAM overlaps"]
        assert overlaps.visible and (np.asarray(overlaps.data) == enhancing).sum() == n
        assert (np.asarray(w.labels_layer.data) == oedema).sum() == whole.sum()
        # one label map cannot hold overlaps: each object gets its own file, the overlap included
        out = tmp_path / "seg.nii.gz"
        written = w.export(out)
        files = [p for p in map(str, written) if "_objects" in p and "enhancing" in p and p.endswith(".nii.gz")]
        assert files, written
        own = np.asarray(nib.load(files[0]).dataobj) > 0
        assert own.sum() == n
    # the object list says each object's volume in mL (1 mm voxels: 1000 voxels per mL)
    texts = [w.object_list.item(i).text() for i in range(w.object_list.count())]
    assert any(t.startswith("enhancing") and t.endswith(" mL") for t in texts)
