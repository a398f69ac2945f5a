"""napari sample data shipped with the repository: a small abdominal CT (MSD spleen, cropped) and an
MR T1 of a soft-tissue sarcoma (IBSI / TCIA Soft-tissue-Sarcoma, patient STS_032, CC BY 3.0).

Looked up, in order: `$MEDSAM_PLUGIN_SAMPLE_DATA` (a folder holding the case folders), the
`sample_data/` folder of a source checkout (editable install), then `sample_data/` under the
current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_CASE = "ct_spleen_msd_spleen2_crop"
SARCOMA_CASE = "mr_sarcoma_ibsi_sts_032"


def sample_ct_path(case: str = SAMPLE_CASE) -> Path:
    """Path of a shipped sample scan (its image.nii.gz); raises FileNotFoundError with advice."""
    candidates = []
    env = os.environ.get("MEDSAM_PLUGIN_SAMPLE_DATA")
    if env:
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "sample_data")
    candidates.append(Path.cwd() / "sample_data")
    for folder in candidates:
        path = folder / case / "image.nii.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The sample scan '{case}/image.nii.gz' was not found (looked in "
        f"{', '.join(str(c) for c in candidates)}). It ships with the source repository: install the "
        "plugin from a checkout (pip install -e .), or set MEDSAM_PLUGIN_SAMPLE_DATA to the "
        "repository's sample_data folder."
    )


def sample_ct() -> list[tuple]:
    """The sample CT as a napari image layer, read like any scan (axial view, mm geometry)."""
    from ._reader import read_scan

    return read_scan(str(sample_ct_path()))


def sample_sarcoma_mr() -> list[tuple]:
    """The sample MR T1 of a thigh sarcoma as a napari image layer (click the tumour, press S, then P)."""
    from ._reader import read_scan

    return read_scan(str(sample_ct_path(SARCOMA_CASE)))
