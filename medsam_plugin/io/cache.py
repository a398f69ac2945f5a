"""The one cache root: every folder and file the plugin caches lives under `cache_root()`.

The root is `$MEDSAM_PLUGIN_CACHE`, else `$XDG_CACHE_HOME/medsam_plugin`, else
`~/.cache/medsam_plugin`. The older names `MEDSAM_PLUGIN_CACHE_DIR` and `MEDSAM_CACHE_DIR` are
still read (when `MEDSAM_PLUGIN_CACHE` is unset), with a DeprecationWarning.

Under it (`cache_dir(name)`):

- `embeddings/`: slice embeddings of the napari widget (`engine.embedding_cache`, `.emb` entries)
- `train_embeddings/`: slice embeddings of fine-tuning runs (the same `.emb` entries)
- `openvino/`: the OpenVINO IR of the image encoder (`model.fast`)
- `autosave/`: the widget's autosaves (`napari._autosave`)
- `sha256.json`: checksums of weights files, to name embeddings without re-hashing (`model.registry`)

Nothing heavy is imported here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["CACHE_ENV", "DEPRECATED_CACHE_ENVS", "EMBEDDINGS", "TRAIN_EMBEDDINGS", "OPENVINO", "AUTOSAVE",
           "SHA256_FILE", "cache_root", "cache_dir"]

CACHE_ENV = "MEDSAM_PLUGIN_CACHE"
DEPRECATED_CACHE_ENVS = ("MEDSAM_PLUGIN_CACHE_DIR", "MEDSAM_CACHE_DIR")

EMBEDDINGS = "embeddings"
TRAIN_EMBEDDINGS = "train_embeddings"
OPENVINO = "openvino"
AUTOSAVE = "autosave"
SHA256_FILE = "sha256.json"


def cache_root() -> Path:
    """The folder every cache of the plugin lives under (see the module docstring)."""
    value = os.environ.get(CACHE_ENV)
    if value:
        return Path(value).expanduser()
    for old in DEPRECATED_CACHE_ENVS:
        value = os.environ.get(old)
        if value:
            warnings.warn(f"The environment variable {old} is deprecated: set {CACHE_ENV} instead (it names the "
                          f"one cache folder of medsam_plugin).", DeprecationWarning, stacklevel=2)
            return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medsam_plugin"


def cache_dir(name: str) -> Path:
    """`cache_root() / name`: one of EMBEDDINGS, TRAIN_EMBEDDINGS, OPENVINO, AUTOSAVE (or SHA256_FILE)."""
    return cache_root() / name
