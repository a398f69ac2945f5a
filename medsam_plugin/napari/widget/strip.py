"""The review strip: one object's per-slice confidence along z, drawn as a QImage (a section of the panel)."""

from __future__ import annotations

import numpy as np
from qtpy.QtGui import QColor, QImage, QPainter, QPixmap
from qtpy.QtWidgets import QLabel

STRIP_WIDTH = 260
STRIP_HEIGHT = 18
STRIP_EMPTY = QColor(60, 60, 60)  # slices the object does not hold (or holds only by painting)
STRIP_SEED = QColor(70, 130, 255)  # slices the user prompted


def confidence_color(confidence: float) -> QColor:
    """Red (0) through yellow to green (1)."""
    return QColor.fromHsv(int(round(120 * float(np.clip(confidence, 0.0, 1.0)))), 210, 235)


def render_confidence_strip(confidence: dict[int, float], n_slices: int, seeds=(), reviewed=(),
                            current: int | None = None, width: int = STRIP_WIDTH,
                            height: int = STRIP_HEIGHT) -> QImage:
    """One object's confidence along z: a cell per slice, slice 0 on the left.

    Seeds are blue, propagated slices red-to-green by confidence, other slices dark grey;
    reviewed slices carry a white tick along the bottom, the current slice a black frame.
    A QImage, not a QPixmap: its colours are exact whatever the display's depth.
    """
    pix = QImage(width, height, QImage.Format_RGB32)
    pix.fill(STRIP_EMPTY)
    n = max(1, int(n_slices))
    painter = QPainter(pix)
    try:
        def span(z):
            x0 = int(round(z * width / n))
            return x0, max(1, int(round((z + 1) * width / n)) - x0)

        seeds = set(seeds)
        for z, c in confidence.items():
            x, w = span(z)
            painter.fillRect(x, 0, w, height, STRIP_SEED if z in seeds else confidence_color(c))
        for z in reviewed:
            x, w = span(z)
            painter.fillRect(x, height - 3, w, 3, QColor(255, 255, 255))
        if current is not None and 0 <= current < n:
            x, w = span(current)
            painter.setPen(QColor(0, 0, 0))
            painter.drawRect(x, 0, max(1, w - 1), height - 1)
    finally:
        painter.end()
    return pix


class ConfidenceStrip(QLabel):
    """The review strip; a click on it shows that slice (`on_slice(z)`)."""

    def __init__(self, on_slice):
        super().__init__()
        self.on_slice = on_slice
        self.n_slices = 0
        self.image: QImage | None = None  # what is shown, for tests and screenshots
        self.setFixedSize(STRIP_WIDTH, STRIP_HEIGHT)
        self.setToolTip("Per-slice confidence of the current object along z (slice 0 on the left): "
                        "blue = your prompted slices, red to green = propagated slices from unsure to sure, "
                        "grey = not in the object. White tick = reviewed. Click to go to a slice; "
                        "G goes to the least confident slice not yet reviewed.")

    def show_image(self, image: QImage, n_slices: int) -> None:
        self.image, self.n_slices = image, n_slices
        self.setPixmap(QPixmap.fromImage(image))

    def clear_strip(self) -> None:
        """No scan: an empty strip that no click acts on."""
        self.image, self.n_slices = None, 0
        blank = QPixmap(STRIP_WIDTH, STRIP_HEIGHT)
        blank.fill(STRIP_EMPTY)
        self.setPixmap(blank)

    def mousePressEvent(self, event):  # noqa: N802 (Qt name)
        if self.n_slices:
            x = event.pos().x()
            self.on_slice(int(np.clip(x * self.n_slices // max(1, self.width()), 0, self.n_slices - 1)))
