"""Issue 11, item 4: the overlap rule is the user's choice, and what a rule withholds is always said.

BraTS 2013 pat0001 as in the report: the "oedema" object is made to cover the whole tumour (as an
over-reaching propagation did), then the enhancing tumour is segmented. A fake predictor answers
each object with its region, so the rule, not the model, decides what each object gets. On the
shipped spleen CT: under "allow overlap" each overlapping object shows in a layer of its own, and
export and File > Save write what those layers show.
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
    from medsam_plugin.napari.widget import MedSAMWidget

    case, volume, label = brats
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(case / "image.nii.gz", plugin="medsam-plugin")
    w = MedSAMWidget(viewer, autosave_policy="ignore", inline=True, embedding_cache=False)
    viewer.window.add_dock_widget(w)
    w.session._predictor = Fake(label > 0)
    w.session.stop_rules = StopRules(min_iou_with_previous=None, policy=StopPolicy.off())
    w.panel.overlap_combo.setCurrentText(mode)
    assert w.session.overlap == {"overwrite none": "none", "overwrite all": "all", "allow overlap": "allow"}[mode]

    whole = label > 0
    oedema = segment(w, qtbot, whole, "oedema")
    assert (w.session.labels.array == oedema).sum() == whole.sum()
    enhancing_truth = label == 4
    enhancing = segment(w, qtbot, enhancing_truth, "enhancing")
    got = w.session.labels.array == enhancing
    status = w.panel.status.text()
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
        own = viewer.layers["MedSAM overlap: enhancing"]  # the overlapping object, in a layer of its own
        assert own.visible and (np.asarray(own.data) == enhancing).sum() == n
        assert "MedSAM overlap: oedema" not in viewer.layers  # the map holds all of the oedema object
        assert (np.asarray(w.labels_layer.data) == oedema).sum() == whole.sum()
        # one label map cannot hold overlaps: each object gets its own file, the overlap included
        out = tmp_path / "seg.nii.gz"
        written = w.export(out)
        files = [p for p in map(str, written) if "_objects" in p and "enhancing" in p and p.endswith(".nii.gz")]
        assert files, written
        own = np.asarray(nib.load(files[0]).dataobj) > 0
        assert own.sum() == n
    # the object list says each object's volume in mL (1 mm voxels: 1000 voxels per mL)
    texts = [w.panel.object_list.item(i).text() for i in range(w.panel.object_list.count())]
    assert any(t.startswith("enhancing") and t.endswith(" mL") for t in texts)


def _combo_with(w, text):
    """The panel's combo box that offers `text` (as a user finds it)."""
    from qtpy.QtWidgets import QComboBox

    return next(c for c in w.findChildren(QComboBox) if text in [c.itemText(i) for i in range(c.count())])


def test_allow_overlap_gives_each_overlapping_object_a_layer_and_a_file(spleen_widget, qtbot, tmp_path):
    """Three objects over one region: "whole" claims all of it first, then "left" and "upper" (which
    also overlap each other). One overlap layer could hold only one label per voxel; each object
    gets a layer with its whole extent, and export and File > Save write what these layers show."""
    viewer, build = spleen_widget
    w = build(predictor=Fake)
    from medsam_plugin.engine.propagation import StopPolicy, StopRules

    w.session.stop_rules = StopRules(min_iou_with_previous=None, policy=StopPolicy.off())  # the rule decides, not a stop
    _combo_with(w, "allow overlap").setCurrentText("allow overlap")
    assert w.session.overlap == "allow"
    ball = w.truth
    nz, ny, nx = ball.shape
    left = ball.copy()
    left[:, :, nx // 2:] = False
    upper = ball.copy()
    upper[:, ny // 2:, :] = False
    whole_id = segment(w, qtbot, ball, "whole")
    active = viewer.layers.selection.active
    left_id = segment(w, qtbot, left, "left")
    upper_id = segment(w, qtbot, upper, "upper")
    assert viewer.layers.selection.active is active  # a new layer does not take the user's tool away
    np.testing.assert_array_equal(w.session.labels.array, np.where(ball, whole_id, 0))  # first claims
    assert "MedSAM overlap: whole" not in viewer.layers  # the map holds all of it
    layers = {i: viewer.layers[f"MedSAM overlap: {n}"] for i, n in ((left_id, "left"), (upper_id, "upper"))}
    for label_id, truth in ((left_id, left), (upper_id, upper)):
        data = np.asarray(layers[label_id].data)
        np.testing.assert_array_equal(data == label_id, truth)  # its whole extent...
        assert not data[~truth].any()  # ...and nothing else
    both = left & upper
    assert both.any() and (np.asarray(layers[left_id].data)[both] == left_id).all() \
        and (np.asarray(layers[upper_id].data)[both] == upper_id).all()  # shared voxels show in both
    # Renaming an object renames its layer.
    w.rename_object(upper_id, "top")
    assert "MedSAM overlap: top" in viewer.layers and "MedSAM overlap: upper" not in viewer.layers

    # Export: the label map is the Labels layer, each object's file what its layer shows.
    from medsam_plugin.io import SliceView

    view = SliceView(w.session.volume)
    written = [str(p) for p in w.export(tmp_path / "seg.nii.gz")]
    got = view.to_view(np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj))
    np.testing.assert_array_equal(got, np.asarray(w.labels_layer.data))
    for label_id, name in ((left_id, "left"), (upper_id, "top")):
        [own] = [p for p in written if "_objects" in p and p.endswith(f"{name}.nii.gz")]
        own_zyx = view.to_view(np.asarray(nib.load(own).dataobj))
        np.testing.assert_array_equal(own_zyx > 0, np.asarray(viewer.layers[f"MedSAM overlap: {name}"].data) > 0)
        # File > Save Selected Layers on the object's layer writes the same voxels on the scan's grid
        out = tmp_path / f"saved_{name}.nii.gz"
        viewer.layers.selection = {viewer.layers[f"MedSAM overlap: {name}"]}
        viewer.layers.save(str(out), selected=True, plugin="medsam-plugin")
        saved = nib.load(str(out))
        assert np.allclose(saved.affine, nib.load(own).affine)
        np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0, np.asarray(nib.load(own).dataobj) > 0)

    # Back to one label map: the objects' own layers go, as their overlaps stop counting.
    _combo_with(w, "overwrite none").setCurrentText("overwrite none")
    assert not [layer.name for layer in viewer.layers if layer.name.startswith("MedSAM overlap")]
