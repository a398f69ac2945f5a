"""Per-slice image embeddings: a bounded in-memory LRU, optionally backed by a disk folder.

Embeddings are kept in float16 (256x64x64 = 2 MiB a slice instead of 4); the decoder gets them
back as float32. The disk layer is keyed by a signature of the slice data, the model and the
preprocessing, so a re-opened scan reuses earlier work and a changed window never does.

A disk entry (`<signature>.emb`) checks itself: an 8-byte magic, the sha1 of the payload, then the
float16 payload. An entry of the wrong size, with a wrong digest or with non-finite values (a
truncated copy, a zeroed or random block, a planted file) is removed and the slice is encoded
again, once; it is never used and never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..io.atomic import atomic_write

EMBEDDING_SHAPE = (256, 64, 64)
_MAGIC = b"MSEMB\x01\x00\x00"  # format 1: magic, sha1(payload) (20 bytes), float16 payload
_DIGEST_BYTES = 20
ENTRY_BYTES = len(_MAGIC) + _DIGEST_BYTES + int(np.prod(EMBEDDING_SHAPE)) * 2  # float16 payload
log = logging.getLogger(__name__)


def encode_entry(value: np.ndarray) -> bytes:
    """The bytes of a disk entry for one (256, 64, 64) embedding."""
    payload = np.ascontiguousarray(value, dtype="<f2").reshape(EMBEDDING_SHAPE).tobytes()
    return _MAGIC + hashlib.sha1(payload).digest() + payload


def decode_entry(data: bytes) -> np.ndarray | None:
    """The embedding of a disk entry, or None when the entry is damaged in any way."""
    if len(data) != ENTRY_BYTES or not data.startswith(_MAGIC):
        return None
    digest = data[len(_MAGIC):len(_MAGIC) + _DIGEST_BYTES]
    payload = data[len(_MAGIC) + _DIGEST_BYTES:]
    if hashlib.sha1(payload).digest() != digest:
        return None
    value = np.frombuffer(payload, dtype="<f2").reshape(EMBEDDING_SHAPE).astype(np.float16)
    if not np.all(np.isfinite(value)):
        return None
    return value


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
        self.disk_repaired = 0  # damaged disk entries removed (and so recomputed)

    def reset(self, signatures: dict[int, str] | None = None) -> None:
        """Forget the in-memory entries (a new volume); `signatures` name each slice on disk."""
        with self._lock:
            self._memory.clear()
            self._signatures = dict(signatures or {})

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
                value = decode_entry(path.read_bytes())
            except OSError:
                value = None
            if value is not None:
                self.disk_hits += 1
                self._remember(z, value)
                return value
            # Damaged: remove it so that `put` writes a good one and later runs don't meet it again.
            log.warning("embedding cache entry %s is damaged; removed, the slice is encoded again", path)
            self.disk_repaired += 1
            try:
                path.unlink()
            except OSError:
                pass
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
        return self.disk_dir / f"{self._signatures[z]}.emb"


def _atomic_save_npy(path: Path, value: np.ndarray) -> None:
    data = encode_entry(value)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write, suffix=".tmp", durable=False)  # an entry checks itself on reading
    except OSError:
        pass  # a full or read-only cache disk only costs speed, never the result


def cached_embeddings(slices_u8: Sequence[np.ndarray], encode: Callable[[np.ndarray], np.ndarray], model_key: str,
                      disk_dir: str | os.PathLike | None = None, batch_size: int = 1,
                      progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """The (256, 64, 64) float16 embeddings of `slices_u8`, through an `EmbeddingCache` on `disk_dir`.

    A slice whose entry (`<slice_signature(slice, model_key)>.emb`) is on disk and intact is read;
    the others (and damaged entries, which are removed) are encoded with `encode` ((B, H, W) uint8
    -> (B, 256, 64, 64), e.g. `engine.predictor.encode_slices`), `batch_size` at a time (slices of
    one batch must share a shape), and kept there. `progress(n, n_to_encode)` after each batch
of n slices encoded. Fine-tuning
    fills and reads its caches with this, so they check themselves as the engine's do.
    """
    cache = EmbeddingCache(max_bytes=0, disk_dir=disk_dir)  # disk only: the caller keeps the list
    if cache.disk_dir is not None:
        cache.reset({i: slice_signature(s, model_key) for i, s in enumerate(slices_u8)})
    out: list[np.ndarray | None] = [cache.get(i) for i in range(len(slices_u8))]
    todo = [i for i, value in enumerate(out) if value is None]
    batch_size = max(1, int(batch_size))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for i, emb in zip(chunk, encode(np.stack([slices_u8[i] for i in chunk]))):
            out[i] = np.ascontiguousarray(emb, dtype=np.float16)
            cache.put(i, out[i])
        if progress is not None:
            progress(len(chunk), len(todo))
    return out  # type: ignore[return-value]
