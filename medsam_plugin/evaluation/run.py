"""Evaluate the tool on labelled scans: one case, or every case of a Decathlon-style datalist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np


def evaluate_case(image_path, label_path, labels: Iterable[int] | None = None, clicks: int = 0,
                  model: str | None = None, device: str = "auto", mode: str | None = None, axis: str = "axial",
                  window=None, loaded_model=None, stop=None, label_names: dict | None = None,
                  progress=None, cache_dir=None, protocol: str = "box") -> dict:
    """Simulated-expert evaluation of one scan; returns the JSON-ready report.

    labels: label values to evaluate (all non-zero values present by default).
    protocol: the first prompt, "box", "click" or "box3d" (see evaluation/simulate.py).
    progress: optional callable(label_id, index, count) called before each object.
    """
    from ..engine.session import SegmentationSession
    from ..io import read_labels, read_volume
    from .simulate import simulate_object

    from ..model.defaults import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    volume = read_volume(image_path)
    truth_ijk = read_labels(label_path, volume)
    session = SegmentationSession(volume, model=model, device=device, axis=axis, window=window,
                                  loaded_model=loaded_model, cache_dir=cache_dir)
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
        scores.append(simulate_object(session, truth_zyx == label_id, label_id, name=name, clicks=clicks,
                                      mode=mode, stop=stop, protocol=protocol))
    predictor = session.predictor
    return {
        "image": str(image_path),
        "label": str(label_path),
        "model": session.predictor.spec.name,
        "mode": mode or session.mode,
        "protocol": protocol,
        "axis": axis,
        "clicks": clicks,
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
