"""Writes the lesion model's patient split and datalist (recipes/lesion_split.json, recipes/lesion_datalist.json).

The split is fixed and recorded here so that the shipped model never trains on a validation patient:
the 41 soft-tissue sarcoma patients of ../shared/lesions, sorted by tumour volume, every fourth one
(ranks 1, 5, 9, ...) held out for validation (10 patients, CT and MR each), so validation spans
small to large tumours; the rest (31) train. The ISLES'22 stroke case and the non-shippable cases of
../shared/data (spinal cord, BraTS) are validation only; the organ cases whose licences allow it
(MSD spleen, TotalSegmentator examples) stay in training so organs do not regress.

    python recipes/make_lesion_datalist.py [--shared ../shared]
Paths in the datalist are relative to the shared folder (`--data-root ../shared`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORGAN_DATALIST = HERE / "interactive_datalist.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(HERE.parents[1] / "shared"))
    args = parser.parse_args()
    shared = Path(args.shared)
    cases = json.loads((shared / "lesions" / "manifest.json").read_text())["cases"]
    sarcoma = [c for c in cases if c["id"].startswith("ibsi_sts_")]
    volume = {}
    for c in sarcoma:
        volume[c["patient"]] = max(volume.get(c["patient"], 0), c["lesion_voxels"])
    by_size = sorted(volume, key=lambda p: (volume[p], p))
    validation_patients = sorted(by_size[1::4])
    training_patients = sorted(p for p in by_size if p not in validation_patients)

    def entry(c: dict) -> dict:
        # Three runs of 6 consecutive slices of a lesion are encoded (chain episodes walk them): at each
        # end, with the slice past it, and round the largest slice; in the axial view (the scans' own: 3.3 mm slices, in-plane 1 mm), the abdomen (soft-tissue)
        # window only, and no augmented copies: 62 volumes give variety enough for a CPU's budget.
        return {"image": f"lesions/{c['id']}/image.nii.gz", "label": f"lesions/{c['id']}/label.nii.gz",
                "name": c["id"], "modality": c["modality"], "patient": c["patient"],
                "labels": {"0": "background", "1": "tumour"},
                "bank": {"all_slices": True, "band": 6, "past_end": 2, "variants": 0, "ct_windows": ["abdomen"], "views": ["axial"]}}

    organs = json.loads(ORGAN_DATALIST.read_text())

    def organ(c: dict) -> dict:
        out = dict(c)
        out["image"], out["label"] = "data/" + c["image"], "data/" + c["label"]
        out["bank"] = {"variants": 1, "ct_windows": ["abdomen", "lung"]}  # organs keep their place, at less cost
        return out

    split = {
        "description": "Patient split of the lesion model (recipes/make_lesion_datalist.py): sarcoma patients "
                       "sorted by tumour volume, every fourth (ranks 1, 5, 9, ...) held out.",
        "training_patients": training_patients,
        "validation_patients": validation_patients,
        "validation_only": ["ISLES22_0009"] + [c["name"] for c in organs["validation"]],
    }
    datalist = {
        "name": "medsam_interactive lesion training data",
        "description": "Paths relative to ../shared (--data-root ../shared). Training: the training patients' "
                       "sarcomas (CT and MR T1, CC BY 3.0) and the shippable organ cases (MSD spleen CC BY-SA 4.0, "
                       "TotalSegmentator examples Apache-2.0). Validation: the validation patients' sarcomas, never "
                       "trained on. See recipes/lesion_split.json.",
        "training": [entry(c) for c in sarcoma if c["patient"] in training_patients] + [organ(c) for c in organs["training"]],
        "validation": [entry(c) for c in sarcoma if c["patient"] in validation_patients],
    }
    (HERE / "lesion_split.json").write_text(json.dumps(split, indent=1) + "\n")
    (HERE / "lesion_datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
    print(f"{len(training_patients)} training patients, {len(validation_patients)} validation: {validation_patients}")


if __name__ == "__main__":
    main()
