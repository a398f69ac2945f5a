"""Shared fixtures: the bundled sample data and the shared real-data cases (../shared/data).

- `sample_dir`: /work/main/sample_data (cases that ship with the project).
- `shared_data_dir`: <repo>/../shared/data; tests that need it are skipped with a clear reason
  when it is absent (e.g. on CI or a user's machine).
- `manifest`: the parsed shared_data_dir/manifest.json (list of case dicts), keyed by case id.
- Parametrisation: a test that takes `sample_case` runs once per sample_data case folder, one
  that takes `shared_case` once per ../shared/data case folder (a single skipped case if absent),
  and one that takes `data_case` once per case of both (ids "sample/<case>", "shared/<case>").
- `write_dicom_series`: a function fixture that writes a synthetic DICOM series with SimpleITK.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# OpenVINO reports usage to Intel from `import openvino` on; hide its telemetry package before any
# test (or plugin) could import openvino, as medsam_plugin.model.fast.import_openvino does.
if "openvino" not in sys.modules:
    sys.modules.setdefault("openvino_telemetry", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample_data"
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_ABSENT_REASON = (
    f"../shared/data is absent (looked in {SHARED_DATA_DIR}): these tests need the team's real "
    f"labelled volumes, which are not shipped with the project; they run only where that folder exists."
)


def case_dirs(root: Path) -> list[Path]:
    """Case folders under `root` that hold image.nii.gz and label.nii.gz, sorted by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "image.nii.gz").is_file() and (p / "label.nii.gz").is_file())


def require_shared_data() -> Path:
    """Return ../shared/data, or skip the calling test with a clear reason when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(SHARED_ABSENT_REASON)
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def manifest(shared_data_dir: Path) -> dict[str, dict]:
    path = shared_data_dir / "manifest.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared data has no manifest.")
    cases = json.loads(path.read_text())
    return {c["id"]: c for c in cases}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sample_case" in metafunc.fixturenames:
        dirs = case_dirs(SAMPLE_DIR)
        params = [pytest.param(d, id=d.name) for d in dirs] or [
            pytest.param(None, id="no-sample-data", marks=pytest.mark.skip(reason=f"{SAMPLE_DIR} holds no cases."))
        ]
        metafunc.parametrize("sample_case", params)
    if "shared_case" in metafunc.fixturenames:
        dirs = case_dirs(SHARED_DATA_DIR)
        params = [pytest.param(d, id=d.name) for d in dirs] or [
            pytest.param(None, id="shared-data-absent", marks=pytest.mark.skip(reason=SHARED_ABSENT_REASON))
        ]
        metafunc.parametrize("shared_case", params)
    if "data_case" in metafunc.fixturenames:
        params = [pytest.param(d, id=f"sample/{d.name}") for d in case_dirs(SAMPLE_DIR)]
        shared = case_dirs(SHARED_DATA_DIR)
        params += [pytest.param(d, id=f"shared/{d.name}") for d in shared] or [
            pytest.param(None, id="shared-data-absent", marks=pytest.mark.skip(reason=SHARED_ABSENT_REASON))
        ]
        metafunc.parametrize("data_case", params)


def _write_dicom_series(folder, image, *, series_uid: str, modality: str = "CT", description: str = ""):
    """Write a 3D SimpleITK image (LPS geometry) as one DICOM file per slice into `folder`.

    Sets the tags a series reader needs: series/study UIDs, ImagePositionPatient (0020|0032) from
    each slice's physical origin, ImageOrientationPatient (0020|0037) from the direction's first two
    columns, instance number, modality and slice thickness. Returns the list of written files.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    iop = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        ipp = "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": series_uid.rsplit(".", 1)[0] + ".1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": ipp,
            "0020|0037": iop,
            "0018|0050": f"{image.GetSpacing()[2]:.10g}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        out = folder / f"{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"
        writer.SetFileName(str(out))
        writer.Execute(sl)
        files.append(out)
    return files


@pytest.fixture
def write_dicom_series():
    return _write_dicom_series


@pytest.fixture(scope="session")
def lite_medsam():
    """The real LiteMedSAM weights, loaded once for the whole test session."""
    from medsam_plugin.model.registry import load_model

    return load_model("lite_medsam", device="cpu")


@pytest.fixture(scope="session")
def embedding_cache_dir(tmp_path_factory):
    """One on-disk embedding cache for all real-model tests: each slice is encoded once per run."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="session")
def spleen_slice(sample_dir, lite_medsam):
    """(predictor-ready uint8 view volume, z, GT box, GT mask) for the spleen sample's largest slice."""
    import numpy as np

    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    case = sample_dir / "ct_spleen_msd_spleen2_crop"
    volume = read_volume(case / "image.nii.gz")
    session = SegmentationSession(volume, loaded_model=lite_medsam)
    truth = session.view.to_view(read_labels(case / "label.nii.gz", volume)) == 1
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    return session.image_u8, z, bounding_box_xyxy(truth[z]), truth[z]


# ---------------------------------------------------------------- napari: the widget over the spleen sample
SPLEEN_CASE = "ct_spleen_msd_spleen2_crop"


@pytest.fixture
def spleen_widget(make_napari_viewer, monkeypatch, tmp_path, sample_dir):
    """(viewer, build): the spleen sample CT opened by the plugin's reader in a napari viewer (Qt on Xvfb).

    `build(inline=True, radius_z=8, policy="ignore", predictor=FakePredictor, **kwargs)` docks a
    `MedSAMWidget` on it (autosave policy `policy`, embeddings in memory, its cache root under
    tmp_path) whose session answers prompts with `predictor(truth, **kwargs)`: `truth` is an
    ellipsoid around slice 12 (z radius `radius_z`), kept as `w.truth`. `predictor=None` keeps the
    session's own (unloaded) model. Used by the napari widget tests that need no real model.
    """
    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(sample_dir / SPLEEN_CASE / "image.nii.gz", plugin="medsam-plugin")
    from fakes import FakePredictor, ellipsoid_zyx

    def build(inline=True, radius_z=8, policy="ignore", predictor=FakePredictor, **kwargs):
        from medsam_plugin.engine.propagation import StopRules
        from medsam_plugin.napari.widget import MedSAMWidget

        w = MedSAMWidget(viewer, autosave_policy=policy, inline=inline, embedding_cache=False)
        viewer.window.add_dock_widget(w)
        nz, ny, nx = w.session.shape_zyx
        w.truth = ellipsoid_zyx(shape=(nz, ny, nx), center=(12, ny // 2, nx // 2), radii=(radius_z, ny // 4, nx // 4))
        if predictor is not None:
            w.session._predictor = predictor(w.truth, **kwargs)
            w.session.stop_rules = StopRules(min_iou_with_previous=None)  # the ellipsoid's tips overlap little
        return w

    return viewer, build


def _pump(n: int = 3) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        time.sleep(0.005)


def canvas_point(viewer, layer, zyx):
    """Where the data point `zyx` of `layer` (on the slice shown) lies on the viewer's canvas, in pixels."""
    import numpy as np
    from qtpy.QtCore import QPointF

    canvas = viewer.window._qt_viewer.canvas
    world = np.asarray(layer.data_to_world(np.asarray(zyx, dtype=float)), dtype=float)
    transform = canvas.view.transform * canvas.view.scene.transform  # napari: world (x, y) <-> canvas pixels
    x, y = transform.map([world[-1], world[-2]])[:2]
    return QPointF(float(x), float(y))


def drag_on_canvas(viewer, layer, path_zyx) -> None:
    """A real left-button drag on the canvas through the data points `path_zyx` of `layer` (mouse press,
    moves, release, as Qt delivers them), e.g. a rectangle-tool box or a brush stroke."""
    from qtpy.QtCore import QEvent, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas.native
    points = [canvas_point(viewer, layer, p) for p in path_zyx]
    left, none, mods = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier

    def send(kind, pos, button, buttons):
        QApplication.sendEvent(native, QMouseEvent(kind, pos, native.mapToGlobal(pos), button, buttons, mods))
        _pump(2)

    send(QEvent.Type.MouseMove, points[0], none, none)
    send(QEvent.Type.MouseButtonPress, points[0], left, left)
    for p in points[1:]:
        send(QEvent.Type.MouseMove, p, none, left)
    send(QEvent.Type.MouseButtonRelease, points[-1], left, none)
    _pump(5)
