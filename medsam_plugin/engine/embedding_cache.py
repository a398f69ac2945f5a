"""Per-slice image embeddings: a bounded in-memory LRU, optionally backed by a disk folder.

Embeddings are kept in float16 (256x64x64 = 2 MiB a slice instead of 4); the decoder gets them
back as float32. The disk layer is keyed by a signature of the slice data, the model and the
preprocessing, so a re-opened scan reuses earlier work and a changed window never does.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write

EMBEDDING_BYTES_FP16 = 256 * 64 * 64 * 2


def slice_signature(slice_u8: np.ndarray, model_key: str) -> str:
    """A key for one preprocessed slice under one model and preprocessing."""
    digest = hashlib.sha1(model_key.encode())
    digest.update(str(slice_u8.shape).encode())
    digest.update(np.ascontiguousarray(slice_u8).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Slice index -> embedding (256, 64, 64) float16 numpy, at most `max_bytes` held in memory.

    `disk_dir`, when given, keeps every embedding on disk as well (spill): evicted entries come
    back from there instead of being recomputed. Thread-safe: the napari worker fills it while
    the GUI thread reads.
    """

    def __init__(self, max_bytes: int | None = 2 * 1024**3, disk_dir: str | os.PathLike | None = None):
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._memory: OrderedDict[int, np.ndarray] = OrderedDict()
        self._signatures: dict[int, str] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    def reset(self, signatures: dict[int, str] | None = None) -> None:
        """Forget the in-memory entries (a new volume); `signatures` name each slice on disk."""
        with self._lock:
            self._memory.clear()
            self._signatures = dict(signatures or {})

    def set_signature(self, z: int, signature: str) -> None:
        with self._lock:
            self._signatures[z] = signature

    @property
    def bytes_in_memory(self) -> int:
        return sum(v.nbytes for v in self._memory.values())

    def __contains__(self, z: int) -> bool:
        with self._lock:
            return z in self._memory or (self._disk_path(z) is not None and self._disk_path(z).exists())

    def get(self, z: int) -> np.ndarray | None:
        with self._lock:
            if z in self._memory:
                self._memory.move_to_end(z)
                self.hits += 1
                return self._memory[z]
            path = self._disk_path(z)
        if path is not None and path.exists():
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                value = None  # a damaged cache file is recomputed, never trusted
            if value is not None and value.shape == (256, 64, 64):
                self.disk_hits += 1
                self._remember(z, value)
                return value
        self.misses += 1
        return None

    def put(self, z: int, embedding: np.ndarray) -> None:
        value = np.ascontiguousarray(embedding, dtype=np.float16)
        self._remember(z, value)
        path = self._disk_path(z)
        if path is not None and not path.exists():
            _atomic_save_npy(path, value)

    def _remember(self, z: int, value: np.ndarray) -> None:
        with self._lock:
            self._memory[z] = value
            self._memory.move_to_end(z)
            if self.max_bytes is not None:
                while len(self._memory) > 1 and self.bytes_in_memory > self.max_bytes:
                    self._memory.popitem(last=False)

    def _disk_path(self, z: int) -> Path | None:
        if self.disk_dir is None or z not in self._signatures:
            return None
        return self.disk_dir / f"{self._signatures[z]}.npy"


def _atomic_save_npy(path: Path, value: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to a name
            np.save(handle, value)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write, suffix=".tmp")
    except OSError:
        pass  # a full or read-only cache disk only costs speed, never the result
