"""Issue 11, item 1: an oblique scan (the spinal cord T2w, tilted 9.3 degrees) segments from its slider.

napari-nifti's convention: the layer is shown with a deobliqued (diagonal) transform, so each slider
position is one slice, and the true affine is kept in the metadata and restored on export.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import require_shared_data  # noqa: E402
from medsam_plugin.io import SliceView, read_volume  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.model]

CASE = "mr_spinalcord_ivadomed_t2w"


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_a_box_at_the_sliders_slice_8_segments_the_oblique_cord(make_napari_viewer, monkeypatch, tmp_path, qtbot,
                                                               lite_medsam):
    from qtpy.QtCore import Qt

    case = require_shared_data() / CASE
    monkeypatch.setenv("MEDSAM_PLUGIN_INLINE", "1")
    monkeypatch.setenv("MEDSAM_PLUGIN_AUTOSAVE", "ignore")
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    volume = read_volume(case / "image.nii.gz")
    view = SliceView(volume)
    truth = view.to_view(read_volume(case / "label.nii.gz").data_ijk) > 0
    assert not np.allclose(volume.affine_ras[:3, :3], np.diag(np.diag(volume.affine_ras[:3, :3])))  # oblique

    viewer = make_napari_viewer()
    (layer,) = viewer.open(case / "image.nii.gz", plugin="medsam-plugin")
    _, w = viewer.window.add_plugin_dock_widget("medsam-plugin", "MedSAM segmentation")
    w.use_loaded_model(lite_medsam)
    assert viewer.dims.nsteps[0] == truth.shape[0] == 16  # one slider position per slice, none black
    np.testing.assert_allclose(layer.metadata["medsam_true_affine"], view.display_affine)

    viewer.dims.set_current_step(0, 8)  # the user moves the slider to 8
    assert w.current_z() == 8
    # The box as napari's rectangle tool stores it: the drag's world corners on the shown plane, in data coords.
    rows, cols = np.nonzero(truth[8])
    plane = np.asarray(viewer.dims.point)
    corners = []
    for r, c in ((rows.min() - 3, cols.min() - 3), (rows.min() - 3, cols.max() + 3),
                 (rows.max() + 3, cols.max() + 3), (rows.max() + 3, cols.min() - 3)):
        world = np.asarray(layer.data_to_world([8, r, c]), dtype=float)
        world[0] = plane[0]
        corners.append(w.box_layer.world_to_data(world))
    w.box_layer.add_rectangles([np.array(corners)])
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key_S)
    assert w.pending is not None and w.pending[1].z == 8
    d = dice(w.pending[1].mask_yx, truth[8])
    print(f"\nDice on the oblique cord, slice 8: {d:.3f}")
    assert d >= 0.8

    # Export restores the true (oblique) affine, voxel for voxel on the source grid.
    w.accept()
    out = tmp_path / "cord.nii.gz"
    w.export(out)
    img = nib.load(str(out))
    assert np.allclose(img.affine, volume.affine_ras)
    got = view.to_view(np.asarray(img.dataobj)) > 0
    np.testing.assert_array_equal(got[8], w.session.labels.array[8] > 0)
    # The writer (File > Save Layers) restores it too.
    out2 = tmp_path / "cord_writer.nii.gz"
    viewer.layers.selection = {w.labels_layer}
    viewer.layers.save(str(out2), selected=True, plugin="medsam-plugin")
    assert np.allclose(nib.load(str(out2)).affine, volume.affine_ras)
