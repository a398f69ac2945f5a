"""Datalists and datasets for fine-tuning: Decathlon ``dataset.json`` -> cached cases -> slice pairs.

A datalist is MONAI's Decathlon format, read with `monai.data.load_decathlon_datalist`::

    {"name": "...", "modality": {"0": "CT"},
     "labels": {"0": "background", "1": "spleen"},
     "training":   [{"image": "case1/image.nii.gz", "label": "case1/label.nii.gz"}, ...],
     "validation": [...]}                       # optional

Extensions a case may carry (all optional): ``"name"`` (shown in messages; default the folder or
file name), ``"modality"`` ("CT" / "MR"; default the datalist's, else guessed from intensities),
``"labels"`` (this case's own value -> name map, when cases come from different datasets) and
``"objects"`` (the label values to train on; default all declared non-zero labels).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


from .transforms import (
    CheckCased,
    DataError,
    EncodeSlicesd,
    LabelledSlicesd,
    ToSliceViewd,
    WindowIntensityd,
)


def case_name(item: dict) -> str:
    """A readable name for a case: its ``name``, else the image's folder (for image.nii.gz) or file."""
    if item.get("name"):
        return str(item["name"])
    path = Path(str(item["image"]))
    stem = path.name.split(".")[0]
    return path.parent.name if stem in ("image", "img", "imaging", "ct", "mr") and path.parent.name else stem


def _decathlon_modality(raw: dict) -> str | None:
    mod = raw.get("modality")
    if isinstance(mod, dict) and mod:
        return str(mod.get("0", next(iter(mod.values()))))
    if isinstance(mod, str):
        return mod
    return None


def _label_map(raw) -> dict[int, str] | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except ValueError:
            raise DataError(f"The datalist's 'labels' must map label values to names, like "
                            f"{{\"0\": \"background\", \"1\": \"spleen\"}}; got keys {list(raw)}.") from None
    if isinstance(raw, (list, tuple)):
        return {i: str(v) for i, v in enumerate(raw)}
    raise DataError("The datalist's 'labels' must be a mapping of label values to names.")


def load_datalist(datalist: str | os.PathLike, data_root: str | os.PathLike | None = None,
                  key: str = "training", objects: Sequence[int] | None = None,
                  required: bool = True) -> list[dict]:
    """Read one list ("training" or "validation") of a Decathlon datalist and check it.

    Returns case dicts with absolute ``image``/``label`` paths and ``case`` (name), ``modality``,
    ``labels_allowed`` (declared values) and ``objects`` (values to train on). Raises `DataError`
    naming the case for a missing file or a label to train on that the datalist does not declare.
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    if not path.is_file():
        raise DataError(f"The datalist '{path}' does not exist. Give the path of a Decathlon-style dataset.json.")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"The datalist '{path}' is not valid JSON: {exc}.") from None
    if not raw.get(key):
        if required:
            raise DataError(f"The datalist '{path}' has no '{key}' list of cases.")
        return []
    root = Path(data_root) if data_root else path.parent
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(root))
    declared = _label_map(raw.get("labels"))
    default_modality = _decathlon_modality(raw)
    cases = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DataError(f"Entry {i} of '{key}' in {path} needs both 'image' and 'label'.")
        item = dict(item)
        name = case_name(item)
        for k in ("image", "label"):
            if not Path(item[k]).exists():
                raise DataError(f"Case '{name}': its {k} file '{item[k]}' does not exist. Fix the path in {path.name} "
                                f"(paths are relative to {root}; change that with --data-root).")
        labels = _label_map(item.get("labels")) or declared
        chosen = item.get("objects", objects)
        if chosen is None:
            chosen = [v for v in (labels or {}) if v != 0] or None
        chosen = None if chosen is None else [int(v) for v in chosen]
        if labels is not None and chosen is not None:
            undeclared = [v for v in chosen if v not in labels]
            if undeclared:
                raise DataError(f"Case '{name}': label value(s) {undeclared} to train on are not in the datalist's "
                                f"labels {sorted(labels)}. Declare them under 'labels' or pick others.")
        modality = item.get("modality") or default_modality
        if isinstance(modality, dict):
            modality = modality.get("0")
        cases.append({
            "image": str(item["image"]), "label": str(item["label"]), "case": name,
            "modality": str(modality) if modality else "auto",
            "labels_allowed": None if labels is None else sorted(labels),
            "objects": chosen,
            # per-case slice-bank settings of interactive training (training/interactive.py: build_bank)
            "bank": dict(item["bank"]) if isinstance(item.get("bank"), dict) else {},
        })
    names = [c["case"] for c in cases]
    if len(set(names)) != len(names):  # make names unique so messages stay unambiguous
        for i, c in enumerate(cases):
            if names.count(c["case"]) > 1:
                c["case"] = f"{c['case']}#{i}"
    return cases


@contextlib.contextmanager
def data_errors():
    """Re-raise a `DataError` that MONAI's ``Compose`` wrapped in "applying transform ..." as itself,
    so the user reads which case is wrong and why, not a transform's repr."""
    try:
        yield
    except RuntimeError as exc:
        cause = exc
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise


def case_transforms(axis: str = "axial", window=None, min_area: int = 10, encode: Callable | None = None,
                    model_key: str = "", margin: int = 1, cache_dir=None, encode_batch: int = 1,
                    progress: Callable | None = None):
    """The deterministic MONAI chain that `CacheDataset` caches (see transforms.py).

    With `encode` (frozen image encoder) the last step embeds every slice training can visit.
    """
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    steps = [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        CheckCased(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS", labels=None),
        ToSliceViewd(keys=["image", "label"], axis=axis),
        WindowIntensityd(keys="image", window=window),
        LabelledSlicesd(keys="label", min_area=min_area),
    ]
    if encode is not None:
        steps.append(EncodeSlicesd(keys="image", encode=encode, model_key=model_key, margin=margin,
                                   cache_dir=cache_dir, batch_size=encode_batch, progress=progress))
    return Compose(steps)


@dataclass
class SlicePair:
    case: int
    label: int
    t: int  # target slice
    n: int  # neighbour whose mask prompts it

    def as_dict(self) -> dict:
        return {"case": self.case, "label": self.label, "t": self.t, "n": self.n}


def slice_pairs(cases: Sequence[dict], margin: int = 1) -> list[SlicePair]:
    """Every (target, neighbour) a propagation walk meets: the neighbour holds the object and the
    target is the next slice up or down, labelled or (at the object's ends) the first empty one."""
    pairs = []
    for ci, case in enumerate(cases):
        n_slices = case["image"].shape[0]
        available = set(case["embeddings"]) if "embeddings" in case else set(range(n_slices))
        for label, zs in case["slices"].items():
            labelled = set(zs)
            for n in zs:
                for t in (n - 1, n + 1):
                    if 0 <= t < n_slices and t in available and n in available:
                        if t in labelled or margin > 0:
                            pairs.append(SlicePair(ci, int(label), t, n))
    return pairs


def split_pairs(pairs: Sequence[SlicePair], every: int = 6) -> tuple[list[SlicePair], list[SlicePair]]:
    """Hold out about 1/`every` of the target slices of each object (deterministic) for validation."""
    train, val = [], []
    for p in pairs:
        (val if (p.t * 7 + p.label * 3 + p.case) % every == 0 else train).append(p)
    if not val and train:
        val.append(train.pop())
    return train, val
