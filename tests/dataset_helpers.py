"""Synthetic dataset folders for the dataset tests, built at test time from copies of the sample data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "ct_spleen_msd_spleen2_crop"


def crop_case(out: Path, z0: int = 8, z1: int = 22, shift: int = 0, label_out: Path | None = None) -> Path:
    """A crop (slices z0..z1 of the last axis) of the spleen sample, written as NIfTI with its own
    geometry (the affine moved to the crop's origin); optionally its ground-truth label too."""
    import nibabel as nib

    img = nib.load(str(SAMPLE / "image.nii.gz"))
    data = np.asarray(img.dataobj)[:, :, z0:z1]
    if shift:
        data = np.roll(data, shift, axis=0)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, z0]) + img.affine[:3, 3]
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine, img.header), str(out))
    if label_out is not None:
        lab = nib.load(str(SAMPLE / "label.nii.gz"))
        ldata = np.asarray(lab.dataobj)[:, :, z0:z1].astype(np.uint8)
        if shift:
            ldata = np.roll(ldata, shift, axis=0)
        label_out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ldata, affine), str(label_out))
    return out


def truth_view(session, label_path) -> np.ndarray:
    from medsam_plugin.io import read_labels

    return session.view.to_view(read_labels(label_path, session.volume)) == 1
