"""Issue 21: what a new user trips over in the panel (Qt on Xvfb, fake predictor; real keys, drags, deletions).

Set MEDSAM_TEST_SCREENS=<folder> to keep a screenshot of each state checked here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import canvas_point, drag_on_canvas  # noqa: E402
from test_napari_widget_trust import box_of, key, make, seed  # noqa: E402,F401  (fixture and helpers)

pytestmark = pytest.mark.gui

MEDSAM_PREFIX = "MedSAM "


def shot(viewer, name: str) -> None:
    folder = os.environ.get("MEDSAM_TEST_SCREENS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(Path(folder) / f"{name}.png"), canvas_only=False)


def medsam_layers(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers if layer.name.startswith(MEDSAM_PREFIX)]


def camera_state(viewer):
    return tuple(np.round(viewer.camera.center, 3)), round(float(viewer.camera.zoom), 4)


def assert_panel_closed(w, viewer):
    """Nothing of the closed scan is left: layers, objects, strip, actions, and the view is fitted."""
    p = w.panel
    assert medsam_layers(viewer) == []
    assert w.session is None and w.image_layer is None and w.label_layers is None and w.prompt_layers is None
    assert p.object_list.count() == 0
    assert p.confidence_strip.n_slices == 0 and p.review_label.text() == "Propagate an object to see how sure each slice is."
    assert not any(b.isEnabled() for b in p.buttons.values())
    assert not p.precompute_btn.isEnabled() and not p.export_btn.isEnabled() and not p.cancel_btn.isEnabled()
    assert p.progress.isHidden()
    assert "closed" in p.status.text()
    fitted = camera_state(viewer)
    viewer.reset_view()
    assert camera_state(viewer) == fitted  # the widget fitted the view already


# ---------------------------------------------------------------- 3: removing the image layer
def test_removing_the_scan_during_propagation_clears_the_panel_and_the_layers(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build(inline=False, radius_z=14, gate_z=17)
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    qtbot.waitUntil(w.session._predictor.reached.is_set, timeout=20_000)
    fake = w.session._predictor
    viewer.camera.zoom *= 3  # the user zoomed in on the object
    viewer.camera.center = (0, *(np.asarray(viewer.camera.center[1:]) + 40))
    shot(viewer, "issue21_3_before_removal_during_P")
    viewer.layers.remove(w.image_layer)
    fake.gate.set()
    assert w.wait(20)
    qtbot.wait(100)  # late reports and the end of the worker: none may bring anything back
    assert_panel_closed(w, viewer)
    shot(viewer, "issue21_3_after_removal_during_P")
    # the keys say what to do instead of acting on a closed scan
    key(viewer, qtbot, Qt.Key_S)
    assert w.session is None and medsam_layers(viewer) == []


def test_deleting_the_scan_in_the_layer_list_after_propagation(make, qtbot):
    from qtpy.QtCore import Qt

    viewer, build = make
    w = build()
    seed(w, viewer, qtbot)
    key(viewer, qtbot, Qt.Key_P)
    assert w.panel.object_list.count() == 1 and w.panel.confidence_strip.n_slices > 0
    viewer.camera.zoom *= 2
    viewer.camera.center = (0, *(np.asarray(viewer.camera.center[1:]) - 30))
    viewer.layers.selection = {w.image_layer}
    qtbot.mouseClick(viewer.window._qt_viewer.layerButtons.deleteButton, Qt.LeftButton)  # the list's bin
    qtbot.wait(50)
    assert "image" not in [layer.name for layer in viewer.layers]
    assert_panel_closed(w, viewer)
    # opening the scan again starts afresh, with the actions back
    from conftest import SAMPLE_DIR, SPLEEN_CASE

    viewer.open(SAMPLE_DIR / SPLEEN_CASE / "image.nii.gz", plugin="medsam-plugin")
    qtbot.waitUntil(lambda: w.session is not None, timeout=5000)
    assert w.panel.buttons["segment"].isEnabled() and w.panel.export_btn.isEnabled()
    assert "MedSAM labels" in medsam_layers(viewer)


# ---------------------------------------------------------------- 4: a model choice is checked when made
def choose_model(w, qtbot, text):
    """Type a model name or path in the panel's model box and press Enter, as a user does."""
    from qtpy.QtCore import Qt

    edit = w.panel.model_combo.lineEdit()
    edit.selectAll()
    qtbot.keyClicks(edit, text)
    qtbot.keyClick(edit, Qt.Key_Return)


def test_a_model_choice_without_usable_weights_is_refused_at_once(make, qtbot, monkeypatch, tmp_path):
    import medsam_plugin.napari.widget.controller as mod
    from medsam_plugin.model import registry

    seen = []
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    viewer, build = make
    w = build()
    before = (w.session.model_name, w.session.device)
    # a registered model whose weights are not bundled
    choose_model(w, qtbot, "sam_vit_b")
    assert "cannot be used" in w.panel.status.text() and "not bundled" in w.panel.status.text()
    assert seen and seen[-1][0] == "warning"
    assert w.panel.model_name() == before[0] and (w.session.model_name, w.session.device) == before
    shot(viewer, "issue21_4_model_not_installed")
    # a checkpoint path that does not exist, and one that is damaged
    choose_model(w, qtbot, str(tmp_path / "missing.pth"))
    assert "does not exist" in w.panel.status.text() and w.panel.model_name() == before[0]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint" * 1000)
    choose_model(w, qtbot, str(junk))
    assert "damaged" in w.panel.status.text() and w.session.model_name == before[0]
    # the package that ships LiteMedSAM's weights is missing: both shipped models need it
    monkeypatch.setattr(registry, "LITE_MEDSAM_PACKAGE", ("no-such-dist-xyz", "no_such_pkg_xyz", "asset/w.pth"))
    choose_model(w, qtbot, "lite_medsam")
    assert "not installed" in w.panel.status.text() and w.session.model_name == before[0]
    # a device that is not here
    if not __import__("torch").cuda.is_available():
        w.panel.device_combo.setCurrentText("cuda")
        assert "cannot be used" in w.panel.status.text() and w.panel.device_name() == before[1]
    monkeypatch.undo()
    monkeypatch.setattr(mod, "_notify", lambda kind, msg: seen.append((kind, msg)))
    # a working choice is taken
    try:
        registry.find_lite_medsam_weights()
    except registry.ModelLoadError:
        return
    n = len(seen)
    choose_model(w, qtbot, "lite_medsam")
    assert w.session.model_name == "lite_medsam" and "lite_medsam" in w.panel.status.text() and len(seen) == n
