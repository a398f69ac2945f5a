"""napari reader: CT/MRI volumes shown in the engine's radiological view with physical geometry.

The layer data is `SliceView.to_view(volume.data_ijk)`, shape (n_slices, rows, cols): for the
default axial view the slider walks inferior -> superior and each slice is shown in radiological
orientation (patient right on the screen's left). The layer's scale/translate (or affine, for
oblique scans) come from `SliceView.display_affine`, so napari measures in millimetres. The
source `Volume` and the view axis travel in `layer.metadata` (keys in `META_*`), which is how the
widget builds its session and how the writer puts label maps back on the source voxel grid.

Oblique scans follow napari-nifti's convention: napari slices a rotated volume off its voxel
planes (a tilted stack shows as many half-black slider positions, and a prompt drawn "on slice 8"
lands between slices), so the layer gets a deobliqued, diagonal transform (the voxel spacing,
centred where the true volume is) and the true view -> world affine travels in
`metadata[META_TRUE_AFFINE]`, which the writer restores on export.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine.preprocessing import WINDOW_PRESETS
from ..io.formats import DICOM_SUFFIX, NIFTI_SUFFIXES, SCAN_SUFFIXES, has_suffix, strip_suffix

META_VOLUME = "medsam_volume"  # the source io.Volume (array as stored, affine, header)
META_AXIS = "medsam_axis"  # the SliceView axis the layer shows ("axial", ...)
META_SOURCE = "medsam_source_path"  # str path of the scan (file or DICOM folder)
META_NAMES = "medsam_label_names"  # {label id: name} (Labels layers)
META_COLORS = "medsam_label_colors"  # {label id: (r, g, b) 0-255} (Labels layers)
META_MODEL = "medsam_model"  # name of the model that made a Labels layer (recorded in a DICOM SEG)
META_TRUE_AFFINE = "medsam_true_affine"  # (4, 4) exact view index (z, y, x) -> world mm, oblique included
META_WINDOW = "medsam_window"  # (preset name, why) the scan opens in (engine.preprocessing.choose_window)

# The display window (level, width) in HU of CT layers: the engine's default (abdomen) preset.
DEFAULT_CT_WINDOW = WINDOW_PRESETS["abdomen"]


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _looks_readable(path: str) -> bool:
    """Cheap check (no pixel data read) that `path` is something `read_volume` handles."""
    p = Path(path)
    if p.is_dir():
        try:
            entries = sorted(p.iterdir())[:64]
        except OSError:
            return False
        files = [e for e in entries if e.is_file()]
        return any(has_suffix(e, (DICOM_SUFFIX,)) or _is_dicom_file(e) for e in files)
    return p.is_file() and has_suffix(p, SCAN_SUFFIXES)


def napari_get_reader(path) -> Callable | None:
    """Return a reader for one CT/MRI file or DICOM folder, or None when it is not one."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if _is_seg_file(path):
        return read_seg
    if not _looks_readable(path):
        return None
    return read_scan


def _is_seg_file(path: str) -> bool:
    from ..io.dicom_seg import is_dicom_seg

    return Path(path).is_file() and is_dicom_seg(path)


def is_oblique(view, atol: float = 1e-6) -> bool:
    """Whether the view's voxel axes are tilted against the world axes it is shown along."""
    lin = np.asarray(view.display_affine, dtype=np.float64)[:3, :3]
    return not (np.allclose(lin, np.diag(np.diag(lin)), atol=atol) and np.all(np.diag(lin) > 0))


def layer_geometry(view) -> dict[str, Any]:
    """napari transform kwargs {"scale", "translate"} that show a `SliceView` array in millimetres.

    Always diagonal, so each slider position is one slice of the array. For an oblique scan it
    is the deobliqued transform (napari-nifti's convention): the spacing is the length of each
    voxel axis, and the volume's centre stays where the true affine puts it. Prompt and label
    layers reuse the same kwargs, so one data coordinate means the same voxel in all of them.
    """
    aff = np.asarray(view.display_affine, dtype=np.float64)
    lin = aff[:3, :3]
    if not is_oblique(view):
        return {"scale": tuple(float(s) for s in np.diag(lin)), "translate": tuple(float(t) for t in aff[:3, 3])}
    spacing = np.linalg.norm(lin, axis=0)
    centre = (np.asarray(view.view_shape, dtype=np.float64) - 1.0) / 2.0
    translate = lin @ centre + aff[:3, 3] - spacing * centre
    return {"scale": tuple(float(s) for s in spacing), "translate": tuple(float(t) for t in translate)}


def image_layer_data(volume, axis: str = "axial", name: str | None = None) -> tuple:
    """(data_zyx, kwargs, "image") for a `Volume`, in the engine's view frame."""
    from ..io import SliceView

    view = SliceView(volume, axis=axis)
    data_zyx = view.to_view(volume.data_ijk)
    kwargs: dict[str, Any] = dict(layer_geometry(view))
    src = volume.source_path
    kwargs["name"] = name or (_scan_name(src) if src is not None else "scan")
    kwargs["metadata"] = {META_VOLUME: volume, META_AXIS: axis, META_SOURCE: str(src) if src else None,
                          META_TRUE_AFFINE: np.asarray(view.display_affine, dtype=np.float64)}
    kwargs["colormap"] = "gray"
    if volume.modality == "CT":
        from ..engine.preprocessing import choose_window

        chosen = choose_window(data_zyx, "CT")  # a lung CT opens in the lung window
        kwargs["metadata"][META_WINDOW] = chosen
        level, width = WINDOW_PRESETS.get(chosen[0], DEFAULT_CT_WINDOW)
        kwargs["contrast_limits"] = (level - width / 2.0, level + width / 2.0)
    else:
        finite = np.asarray(data_zyx[:: max(1, data_zyx.shape[0] // 16)], dtype=np.float64)
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        kwargs["contrast_limits"] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    return data_zyx, kwargs, "image"


def _scan_name(src) -> str:
    return strip_suffix(src, SCAN_SUFFIXES)


def read_scan(path) -> list[tuple]:
    """Read one scan into a napari image layer (axial view, mm geometry, source in metadata)."""
    from ..io import read_volume

    if isinstance(path, (list, tuple)):
        path = path[0]
    volume = read_volume(path)
    data, kwargs, kind = image_layer_data(volume)
    if volume.source_path is not None and has_suffix(volume.source_path, NIFTI_SUFFIXES):
        # "image.nii.gz" in a case folder: name the layer after the folder, which says more.
        if kwargs["name"] in ("image", "img", "ct", "mri", "t1", "t2"):
            kwargs["name"] = f"{volume.source_path.parent.name}/{kwargs['name']}"
    return [(data, kwargs, kind)]


def labels_layer_data(labels_ijk: np.ndarray, volume, axis: str = "axial", *, names=None, colors=None,
                      name: str = "labels", source=None) -> tuple:
    """(labels_zyx, kwargs, "labels") for a label volume on `volume`'s grid, in the engine's view frame.

    Names and colours go in `metadata` (META_NAMES, META_COLORS) for the widget and the writer,
    colours also in the layer's colormap and names in its `features` (shown under the cursor).
    """
    from ..io import SliceView
    from ..io.colors import default_label_color

    view = SliceView(volume, axis=axis)
    data_zyx = view.to_view(labels_ijk)
    names = {int(k): str(v) for k, v in (names or {}).items()}
    colors = {int(k): tuple(int(c) for c in v[:3]) for k, v in (colors or {}).items()}
    ids = sorted(set(names) | {int(i) for i in np.unique(labels_ijk) if i})
    for i in ids:
        names.setdefault(i, f"label {i}")
        colors.setdefault(i, default_label_color(i))
    colormap = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    colormap.update({i: (*(c / 255.0 for c in colors[i]), 1.0) for i in ids})
    kwargs: dict[str, Any] = dict(layer_geometry(view))
    kwargs.update(
        name=name,
        metadata={META_VOLUME: volume, META_AXIS: axis, META_SOURCE: str(source) if source else None,
                  META_NAMES: names, META_COLORS: colors,
                  META_TRUE_AFFINE: np.asarray(view.display_affine, dtype=np.float64)},
        colormap=colormap,
        features={"index": [0, *ids], "name": ["background", *(names[i] for i in ids)]},
        opacity=0.55,
    )
    return data_zyx, kwargs, "labels"


def _open_volume_for_series(series_uids: list[str]):
    """(Volume, axis) of a scan already open in napari whose DICOM series is one of `series_uids`."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return None
    if viewer is None:
        return None
    for layer in viewer.layers:
        vol = getattr(layer, "metadata", {}).get(META_VOLUME)
        header = getattr(vol, "header", None)
        if isinstance(header, dict) and header.get("series_uid") in series_uids:
            return vol, layer.metadata.get(META_AXIS, "axial")
    return None


def _find_series_near(seg_path: Path, series_uids: list[str]):
    """The folder next to a SEG (its own, its parent, their sub-folders) that holds one of `series_uids`."""
    from ..io import list_dicom_series

    here, up = seg_path.parent, seg_path.parent.parent
    candidates = [here, *sorted(d for d in here.iterdir() if d.is_dir())]
    if up != here:
        candidates += [up, *sorted(d for d in up.iterdir() if d.is_dir() and d != here)]
    for folder in candidates[:64]:
        if not _looks_readable(str(folder)):
            continue
        try:
            found = {s["series_uid"] for s in list_dicom_series(folder)}
        except Exception:
            continue
        for uid in series_uids:
            if uid in found:
                return folder, uid
    return None


def read_seg(path) -> list[tuple]:
    """Read a DICOM SEG as a Labels layer on its source series' grid (with the scan, unless it is open).

    The source series is the scan already open in napari with the Series Instance UID the SEG
    references, or else the series found in the SEG's folder, its parent, or their sub-folders.
    """
    from ..io import ImageReadError, read_volume
    from ..io.dicom_seg import read_dicom_seg, referenced_series_uids

    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(path)
    uids = referenced_series_uids(p)
    layers: list[tuple] = []
    opened = _open_volume_for_series(uids)
    if opened is not None:
        volume, axis = opened
    else:
        found = _find_series_near(p, uids)
        if found is None:
            raise ImageReadError(
                f"The DICOM SEG '{p}' was made on DICOM series {', '.join(uids) or '(not stated)'}, which is neither "
                f"open in napari nor in a folder next to the SEG. Open that series first (File > Open Folder), then "
                f"open the SEG again."
            )
        volume, axis = read_volume(found[0], series_uid=found[1]), "axial"
        layers.append(image_layer_data(volume, axis))
    seg = read_dicom_seg(p, volume)
    layers.append(labels_layer_data(seg.labels_ijk, volume, axis, names=seg.names, colors=seg.colors,
                                    name=_scan_name(p), source=p))
    return layers
