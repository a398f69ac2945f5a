"""napari sample data: the small abdominal CT shipped with the repository (MSD spleen, cropped).

Looked up, in order: `$MEDSAM_PLUGIN_SAMPLE_DATA` (a folder holding the case folders), the
`sample_data/` folder of a source checkout (editable install), then `sample_data/` under the
current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_CASE = "ct_spleen_msd_spleen2_crop"


def sample_ct_path() -> Path:
    """Path of the shipped sample CT (image.nii.gz); raises FileNotFoundError with advice."""
    candidates = []
    env = os.environ.get("MEDSAM_PLUGIN_SAMPLE_DATA")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "sample_data")
    candidates.append(Path.cwd() / "sample_data")
    for folder in candidates:
        path = folder / SAMPLE_CASE / "image.nii.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The sample CT '{SAMPLE_CASE}/image.nii.gz' was not found (looked in "
        f"{', '.join(str(c) for c in candidates)}). It ships with the source repository: install the "
        "plugin from a checkout (pip install -e .), or set MEDSAM_PLUGIN_SAMPLE_DATA to the "
        "repository's sample_data folder."
    )


def sample_ct() -> list[tuple]:
    """The sample CT as a napari image layer, read like any scan (axial view, mm geometry)."""
    from ._reader import read_scan

    return read_scan(str(sample_ct_path()))
