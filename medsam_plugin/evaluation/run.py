"""Evaluate the tool on labelled scans: one case, or every case of a Decathlon-style datalist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np


def evaluate_case(image_path, label_path, choice=None, expert=None, labels: Iterable[int] | None = None,
                  loaded_model=None, label_names: dict | None = None, progress=None) -> dict:
    """Simulated-expert evaluation of one scan; returns the JSON-ready report.

    choice: the `engine.choice.ModelChoice` (model, device, window, axis, embedding cache); the
        default model on "auto" by default. loaded_model: that model already loaded (shared by cases).
    expert: the `evaluation.simulate.ExpertSettings` (protocol: the first prompt, "box", "click" or
        "box3d"; corrective clicks; propagation mode and stop rules); one box and no clicks by default.
    labels: label values to evaluate (all non-zero values present by default).
    progress: optional callable(label_id, index, count) called before each object.
    """
    from ..engine.choice import ModelChoice
    from ..io import read_labels, read_volume
    from .simulate import CLICK_RULE, ExpertSettings

    choice = choice or ModelChoice()
    expert = expert or ExpertSettings()
    volume = read_volume(image_path)
    truth_ijk = read_labels(label_path, volume)
    session = choice.session(volume, loaded_model=loaded_model)
    truth_zyx = session.view.to_view(truth_ijk)
    present = [int(v) for v in np.unique(truth_zyx) if v != 0]
    chosen = present if labels is None else [int(v) for v in labels]
    missing = [v for v in chosen if v not in present]
    if missing:
        raise ValueError(f"Label value(s) {missing} do not occur in {label_path}; present: {present}.")
    # Smallest structures first, as an expert segments nested regions (tumour core before the
    # oedema around it): the first object to claim a voxel keeps it. "dice" scores that label map;
    # "dice_own" each object's own result before those claims.
    sizes = {v: int((truth_zyx == v).sum()) for v in chosen}
    scores = []
    for i, label_id in enumerate(sorted(chosen, key=lambda v: sizes[v])):
        if progress is not None:
            progress(label_id, i, len(chosen))
        name = (label_names or {}).get(label_id, f"label {label_id}")
        scores.append(expert.simulate(session, truth_zyx == label_id, label_id, name=name))
    predictor = session.predictor
    return {
        "image": str(image_path),
        "label": str(label_path),
        "model": session.predictor.spec.name,
        "mode": expert.mode or session.mode,
        "protocol": expert.protocol,
        "axis": choice.axis,
        "clicks": expert.clicks,
        "click_rule": CLICK_RULE,
        "objects": sorted((s.as_dict() for s in scores), key=lambda o: o["label"]),
        "mean_dice": float(np.mean([s.dice for s in scores])) if scores else float("nan"),
        "mean_nsd": float(np.mean([s.nsd for s in scores])) if scores else float("nan"),
        # Each object's own result, before the first-claim rule resolved overlaps (see simulate.py).
        "mean_dice_own": float(np.mean([s.dice_own for s in scores])) if scores else float("nan"),
        "mean_nsd_own": float(np.mean([s.nsd_own for s in scores])) if scores else float("nan"),
        "mean_seed_dice": float(np.mean([s.seed_dice for s in scores])) if scores else float("nan"),
        "mean_dsc_auc": float(np.mean([s.dsc_auc for s in scores])) if scores else float("nan"),
        "mean_nsd_auc": float(np.mean([s.nsd_auc for s in scores])) if scores else float("nan"),
        "slices_encoded": predictor.encode_count,
        "prompts_decoded": predictor.decode_count,
    }


def datalist_cases(datalist_path, data_root=None, key: str | None = None) -> list[dict]:
    """Cases (dicts with 'image' and 'label' paths) of a Decathlon `dataset.json`, via MONAI."""
    from monai.data import load_decathlon_datalist

    datalist_path = Path(datalist_path)
    root = Path(data_root) if data_root else datalist_path.parent
    raw = json.loads(datalist_path.read_text())
    keys = [key] if key else [k for k in ("validation", "training", "test") if raw.get(k)]
    cases = []
    for k in keys:
        for item in load_decathlon_datalist(str(datalist_path), is_segmentation=True, data_list_key=k,
                                            base_dir=str(root)):
            if isinstance(item, dict) and "label" in item:
                cases.append(item)
    if not cases:
        raise ValueError(f"{datalist_path} lists no cases with both 'image' and 'label'.")
    return cases
