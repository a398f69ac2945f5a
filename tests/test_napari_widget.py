"""The MedSAM dock widget under a real Qt/OpenGL (Xvfb via pytest-xvfb), on the shipped spleen CT.

The widget is opened through the plugin manifest (reader, sample data, dock widget) and driven
through its handlers and simulated key presses, with the real LiteMedSAM weights. Long work runs
inline (MEDSAM_PLUGIN_INLINE=1) except in the cancel test, which needs a real worker thread.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medsam_plugin.io import SliceView, read_volume  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.model]

CASE = "ct_spleen_msd_spleen2_crop"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def spleen(sample_dir):
    """(image path, source Volume, spleen label in the view frame, largest slice, its box xyxy)."""
    image_path = sample_dir / CASE / "image.nii.gz"
    volume = read_volume(image_path)
    view = SliceView(volume)
    label_zyx = view.to_view(read_volume(sample_dir / CASE / "label.nii.gz").data_ijk) > 0
    z = int(label_zyx.sum(axis=(1, 2)).argmax())
    rows, cols = np.nonzero(label_zyx[z])
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)
    return image_path, volume, label_zyx, z, box


@pytest.fixture(scope="module")
def plugin_cache(tmp_path_factory, embedding_cache_dir):
    """A cache root whose embeddings are the test session's shared on-disk cache: each slice is
    encoded once per run (also across the engine's real-model tests)."""
    root = tmp_path_factory.mktemp("medsam_cache")
    (root / "embeddings").symlink_to(embedding_cache_dir, target_is_directory=True)
    return root


@pytest.fixture
def opened(make_napari_viewer, monkeypatch, plugin_cache, lite_medsam, spleen):
    """A viewer with the spleen CT opened by the plugin's reader and the widget docked from the manifest."""
    monkeypatch.setenv("MEDSAM_PLUGIN_INLINE", "1")
    monkeypatch.setenv("MEDSAM_PLUGIN_AUTOSAVE", "ignore")
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(plugin_cache))
    viewer = make_napari_viewer()
    image_path = spleen[0]
    layers = viewer.open(image_path, plugin="medsam-plugin")
    _, widget = viewer.window.add_plugin_dock_widget("medsam-plugin", "MedSAM segmentation")
    widget.use_loaded_model(lite_medsam)
    assert widget.session is not None and widget.image_layer.name == layers[0].name
    return viewer, widget


def press(viewer, qtbot, key, modifier=None):
    from qtpy.QtCore import Qt

    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, key, modifier or Qt.NoModifier)


def test_box_segment_propagate_undo_export(opened, spleen, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer, widget = opened
    image_path, volume, label_zyx, z, box = spleen
    layer = widget.image_layer
    view = SliceView(volume)
    # The reader shows the engine's view with physical geometry and keeps the source volume.
    np.testing.assert_array_equal(layer.data, view.to_view(volume.data_ijk))
    np.testing.assert_allclose(layer.scale, view.view_spacing)
    assert (lambda v: v.source_path == volume.source_path and np.array_equal(v.affine_ras, volume.affine_ras) and np.array_equal(v.data_ijk, volume.data_ijk))(layer.metadata["medsam_volume"])  # the source scan itself, as read

    widget.set_slice(z)
    assert widget.current_z() == z
    widget.add_box(box)
    assert viewer.layers.selection.active.name == widget.box_layer.name  # 'S' must beat the Shapes layer's own 'S'
    press(viewer, qtbot, Qt.Key_S)
    labels = widget.labels_layer
    assert widget.pending is not None
    # the slice result shows in its own layer until it is accepted; the Labels layer holds only accepted work
    assert dice(viewer.layers["MedSAM pending"].data[z] == 1, label_zyx[z]) > 0.9
    assert not np.asarray(labels.data).any()

    t0 = time.perf_counter()
    press(viewer, qtbot, Qt.Key_P)  # accepts the slice and propagates both ways
    propagate_s = time.perf_counter() - t0
    result = np.asarray(labels.data) == 1
    d = dice(result, label_zyx)
    print(f"\nDice vs. spleen label after box + propagate: {d:.3f} ({propagate_s:.1f} s)")
    assert d >= 0.88
    np.testing.assert_array_equal(labels.data, widget.session.labels.array)

    # Re-prompt on a cached slice: one more click only decodes.
    widget.add_point(np.argwhere(label_zyx[z]).mean(axis=0), positive=True, z=z)
    t0 = time.perf_counter()
    widget.segment_slice()
    reprompt_ms = (time.perf_counter() - t0) * 1000
    print(f"re-prompt on a cached slice through the widget: {reprompt_ms:.0f} ms")
    widget.undo()  # drops the preview
    np.testing.assert_array_equal(labels.data, widget.session.labels.array)

    # Undo (Ctrl+Z) takes the propagation back; redo brings it again.
    press(viewer, qtbot, Qt.Key_Z, Qt.ControlModifier)
    after_undo = np.asarray(labels.data) == 1
    assert after_undo[z].any() and not np.delete(after_undo, z, axis=0).any()
    widget.redo()
    np.testing.assert_array_equal(np.asarray(labels.data) == 1, result)

    # Export: one label map + names on the source grid; reload and compare geometry exactly.
    widget.rename_object(1, "spleen")
    out = tmp_path / "seg.nii.gz"
    written = widget.export(out, per_object_dir=tmp_path / "objects")
    assert out in written
    img = nib.load(str(out))
    assert img.shape == volume.shape
    assert np.allclose(img.affine, volume.affine_ras)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), view.from_view(result.astype(np.uint8)))
    assert "spleen" in (tmp_path / "seg.labels.json").read_text()
    assert list((tmp_path / "objects").glob("*.nii.gz"))

    # The napari writer (File > Save Layers) gives the same file from the Labels layer.
    out2 = tmp_path / "seg_writer.nii.gz"
    viewer.layers.selection = {labels}
    saved = viewer.layers.save(str(out2), selected=True, plugin="medsam-plugin")
    assert str(out2) in saved
    img2 = nib.load(str(out2))
    assert np.allclose(img2.affine, img.affine)
    np.testing.assert_array_equal(np.asarray(img2.dataobj), np.asarray(img.dataobj))


def test_painting_is_respected_by_other_objects(opened, spleen, qtbot):
    viewer, widget = opened
    _, _, label_zyx, z, box = spleen
    widget.set_slice(z)
    widget.add_box(box)
    widget.segment_slice()
    widget.accept()
    spleen_id = widget.current_label
    # A second object painted inside the spleen, on a neighbouring slice, with napari's brush.
    other = widget.add_object("painted")
    labels = widget.labels_layer
    zz = z + 1
    rows, cols = np.nonzero(label_zyx[zz])
    centre = (zz, int(rows.mean()), int(cols.mean()))
    labels.brush_size = 9
    labels.selected_label = other
    labels.paint(centre, other)
    painted = np.asarray(labels.data) == other
    assert painted.sum() > 20
    # synced into the session after napari's paint event
    qtbot.waitUntil(lambda: (widget.session.labels.array == other).sum() == painted.sum(), timeout=5000)
    # Propagating the spleen never takes the painted voxels.
    widget.select_object(spleen_id)
    widget.propagate("up")
    final = np.asarray(labels.data)
    assert (final[painted] == other).all()
    assert (final == spleen_id).any(axis=(1, 2))[zz]


def test_cancel_leaves_labels_unchanged(make_napari_viewer, monkeypatch, tmp_path, lite_medsam, spleen, qtbot):
    """A threaded propagation cancelled after its first slice changes nothing."""
    from medsam_plugin.napari.widget import MedSAMWidget

    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    image_path, _, _, z, box = spleen
    viewer.open(image_path, plugin="medsam-plugin")
    widget = MedSAMWidget(viewer, autosave_policy="ignore", inline=False, embedding_cache=False)
    viewer.window.add_dock_widget(widget)
    widget.use_loaded_model(lite_medsam)
    widget.set_slice(z)
    widget.add_box(box)
    widget.segment_slice()
    assert widget.wait(120)
    widget.accept()
    before = widget.session.labels.array.copy()
    task = widget.propagate("both")
    pending = viewer.layers["MedSAM pending"]
    qtbot.waitUntil(lambda: np.asarray(pending.data).any(), timeout=120_000)  # the first slices show...
    np.testing.assert_array_equal(widget.labels_layer.data, before)  # ...outside the Labels layer
    assert not widget.labels_layer.editable  # no painting while a worker writes
    widget.cancel()
    assert widget.wait(120)
    assert task.cancel_event.is_set()
    np.testing.assert_array_equal(widget.session.labels.array, before)
    np.testing.assert_array_equal(widget.labels_layer.data, before)
    assert not np.asarray(pending.data).any()
    assert widget.labels_layer.editable
