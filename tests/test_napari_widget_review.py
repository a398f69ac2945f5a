"""The review strip and the G key (least confident slice not yet reviewed), on a fake predictor (Qt on Xvfb)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from fakes import FakePredictor  # noqa: E402

pytestmark = pytest.mark.gui

class DoubtfulFake(FakePredictor):
    """The true object, with a predicted IoU that falls away from slice 12 (so confidence does too)."""

    loaded = None  # the widget remembers predictor.loaded after a run

    def predict(self, z, **kwargs):
        pred = super().predict(z, **kwargs)
        return dataclasses.replace(pred, iou=0.93 - 0.03 * abs(int(z) - 12))


@pytest.fixture
def widget(spleen_widget):
    """(viewer, widget, truth): conftest's `spleen_widget`, its session answering through `DoubtfulFake`."""
    viewer, build = spleen_widget
    w = build(predictor=DoubtfulFake)
    return viewer, w, w.truth


def key(viewer, qtbot, k):
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, k, Qt.NoModifier)


def strip_color(w, z):
    """The strip's colour in the middle of slice z's cell."""
    image = w.panel.confidence_strip.image
    n = w.session.shape_zyx[0]
    x = int((z + 0.5) * image.width() / n)
    return image.pixelColor(x, image.height() // 2)


def test_g_walks_the_least_confident_slices_and_the_strip_shows_them(widget, qtbot):
    from qtpy.QtCore import Qt

    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.napari.widget.strip import STRIP_EMPTY, STRIP_SEED

    viewer, w, truth = widget
    z0 = 12
    w.set_slice(z0)
    x0, y0, x1, y1 = bounding_box_xyxy(truth[z0])
    w.add_box(np.array([x0, y0, x1, y1]))
    w.segment_slice()
    key(viewer, qtbot, Qt.Key_P)  # accept + propagate
    conf = w.session.confidence_of(w.current_label)
    present = sorted(np.flatnonzero(truth.any(axis=(1, 2))))
    assert sorted(conf) == present and conf[z0] == 1.0

    # The strip: the seed blue, propagated slices coloured, slices outside the object grey.
    assert not w.panel.confidence_strip.pixmap().isNull()
    assert strip_color(w, z0).rgb() == STRIP_SEED.rgb(), (strip_color(w, z0).getRgb(), STRIP_SEED.getRgb())
    outside = max(present) + 2
    assert strip_color(w, outside).rgb() == STRIP_EMPTY.rgb()
    near, far = strip_color(w, z0 + 1), strip_color(w, max(present))
    assert near.hue() > far.hue()  # greener next to the seed, redder at the uncertain end

    # G shows the least confident propagated slice, then the next one; each becomes reviewed.
    expected = sorted((c, z) for z, c in conf.items() if z != z0)
    seen = []
    for _ in range(3):
        key(viewer, qtbot, Qt.Key_G)
        seen.append(w.current_z())
    assert seen == [z for _, z in expected[:3]]
    assert w.reviewed[w.current_label] == set(seen)
    assert "confidence" in w.panel.status.text()
    image = w.panel.confidence_strip.image
    cell = lambda z: int((z + 0.5) * image.width() / w.session.shape_zyx[0])  # noqa: E731
    assert image.pixelColor(cell(seen[0]), image.height() - 1).lightness() == 255  # reviewed tick

    # Review everything: G then says so and stays put.
    for _ in range(len(expected) - 3):
        w.review_next()
    here = w.current_z()
    assert w.review_next() is None and w.current_z() == here
    assert "reviewed" in w.panel.status.text()

    # A click on the strip shows that slice.
    from qtpy.QtCore import QPoint

    qtbot.mouseClick(w.panel.confidence_strip, Qt.LeftButton, pos=QPoint(cell(z0), 5))
    assert w.current_z() == z0

    # Re-propagating rewrites the slices: they are to be reviewed again.
    w.propagate("both")
    assert w.reviewed[w.current_label] == set()
    assert w.review_next() == expected[0][1]
