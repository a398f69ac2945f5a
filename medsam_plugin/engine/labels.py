"""A multi-object label volume in view space, with an explicit overlap rule and undo/redo.

Overlap rule: a voxel belongs to the first object that claimed it. Committing object A's mask
never overwrites voxels of another object B (so a propagation cannot eat a neighbour, nor what a
user painted for it) unless the caller asks for `overwrite=True`. Re-committing A on a slice
replaces A's own voxels on that slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..io.writers import label_dtype_for


@dataclass
class SegmentedObject:
    label_id: int
    name: str
    color: tuple[int, int, int]


class LabelVolume:
    """(Z, H, W) uint16 labels in the engine's view frame, edited slice-wise with an undo history."""

    def __init__(self, shape_zyx: tuple[int, int, int], max_undo: int = 50):
        self.array = np.zeros(shape_zyx, dtype=np.uint16)
        self.objects: dict[int, SegmentedObject] = {}
        # History entries: (what, slice indices, those slices before, owner's extra state before).
        self._undo: list[tuple] = []
        self._redo: list[tuple] = []
        self.max_undo = max_undo
        self.pushes = 0  # history entries ever pushed: `merge_last(pushes - earlier)` groups a workflow step
        # (snapshot, restore) callables of an owner whose own state (for example a session's seeds)
        # must travel with undo/redo; None when only the voxels matter.
        self.extra_state: tuple | None = None

    # ------------------------------------------------------------------ objects
    def add_object(self, name: str | None = None, label_id: int | None = None,
                   color: tuple[int, int, int] | None = None) -> SegmentedObject:
        if label_id is None:
            label_id = max(self.objects, default=0) + 1
        label_id = int(label_id)
        if not 1 <= label_id <= 65535:
            raise ValueError(f"Label ids run from 1 to 65535; got {label_id}.")
        if label_id in self.objects:
            raise ValueError(f"Label {label_id} is already used by '{self.objects[label_id].name}'.")
        from ..io.colors import default_label_color

        obj = SegmentedObject(label_id, name or f"object {label_id}", tuple(color or default_label_color(label_id)))
        self.objects[label_id] = obj
        return obj

    def remove_object(self, label_id: int) -> None:
        """Forget an object and clear its voxels (undoable)."""
        self.clear_object(label_id)
        self.objects.pop(label_id, None)

    def names(self) -> dict[int, str]:
        return {k: o.name for k, o in self.objects.items()}

    # ------------------------------------------------------------------ edits
    def commit(self, label_id: int, masks: dict[int, np.ndarray], overwrite: bool = False,
               replace_own: bool = True, what: str = "commit", protected: Iterable[int] = ()) -> int:
        """Write one object's per-slice masks (z -> (H, W) bool); returns voxels changed.

        protected: label ids whose voxels are never overwritten, even with `overwrite` (locked objects).
        """
        if label_id not in self.objects:
            raise KeyError(f"No object with label {label_id}; add it first.")
        if not masks:
            return 0
        zs = np.array(sorted(masks), dtype=np.int64)
        before = self.array[zs].copy()
        protected = [int(p) for p in protected if int(p) != label_id]
        for z in zs:
            current = self.array[z]
            if replace_own:
                current[current == label_id] = 0
            mask = np.asarray(masks[int(z)], dtype=bool)
            if mask.shape != current.shape:
                raise ValueError(f"Mask for slice {z} has shape {mask.shape}; the slice is {current.shape}.")
            writable = mask if overwrite else mask & ((current == 0) | (current == label_id))
            if protected:
                writable = writable & ~np.isin(current, protected)
            current[writable] = label_id
        changed = int((self.array[zs] != before).sum())
        if changed:
            self._push(what, zs, before)
        return changed

    def clear_object(self, label_id: int, zs: Iterable[int] | None = None) -> int:
        sel = np.array(sorted(set(zs)) if zs is not None else np.flatnonzero((self.array == label_id).any(axis=(1, 2))),
                       dtype=np.int64)
        if sel.size == 0:
            return 0
        before = self.array[sel].copy()
        part = self.array[sel]
        part[part == label_id] = 0
        self.array[sel] = part
        changed = int((self.array[sel] != before).sum())
        if changed:
            self._push(f"clear {label_id}", sel, before)
        return changed

    def set_array(self, new_array: np.ndarray, what: str = "edit") -> int:
        """Replace the whole volume (for example after painting in napari), undoably."""
        new_array = np.asarray(new_array)
        if new_array.shape != self.array.shape:
            raise ValueError(f"Label array has shape {new_array.shape}; expected {self.array.shape}.")
        zs = np.flatnonzero((new_array != self.array).any(axis=(1, 2)))
        if zs.size == 0:
            return 0
        before = self.array[zs].copy()
        self.array[zs] = new_array[zs]
        self._push(what, zs, before)
        for label_id in np.unique(self.array[zs]):
            if label_id and int(label_id) not in self.objects:
                self.add_object(label_id=int(label_id))
        return int((self.array[zs] != before).sum())

    # ------------------------------------------------------------------ history
    def _push(self, what: str, zs: np.ndarray, before: np.ndarray) -> None:
        self._undo.append((what, zs, before, self._snapshot_extra()))
        del self._undo[:-self.max_undo]
        self._redo.clear()
        self.pushes += 1

    def merge_last(self, n: int, what: str) -> None:
        """Make the last `n` history entries one undo step (for example a correction and its re-propagation)."""
        n = min(int(n), len(self._undo))
        if n < 2:
            if n == 1:
                self._undo[-1] = (what, *self._undo[-1][1:])
            return
        entries = self._undo[-n:]
        del self._undo[-n:]
        before: dict[int, np.ndarray] = {}
        for _, zs, slices, _ in reversed(entries):  # the oldest entry's copy of a slice wins
            for z, sl in zip(zs.tolist(), slices):
                before[z] = sl
        zs = np.array(sorted(before), dtype=np.int64)
        self._undo.append((what, zs, np.stack([before[int(z)] for z in zs]), entries[0][3]))

    def _snapshot_extra(self):
        return self.extra_state[0]() if self.extra_state else None

    def _swap(self, source: list, target: list) -> str | None:
        if not source:
            return None
        what, zs, slices, extra = source.pop()
        target.append((what, zs, self.array[zs].copy(), self._snapshot_extra()))
        self.array[zs] = slices
        if self.extra_state and extra is not None:
            self.extra_state[1](extra)
        return what

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> str | None:
        """Revert the last edit; returns its description, or None when there is nothing to undo."""
        return self._swap(self._undo, self._redo)

    def redo(self) -> str | None:
        """Re-apply the last undone edit; returns its description, or None."""
        return self._swap(self._redo, self._undo)

    # ------------------------------------------------------------------ export
    def export_array(self) -> np.ndarray:
        """The labels in the smallest safe dtype: uint8, or uint16 past 254."""
        top = int(self.array.max()) if self.array.size else 0
        return self.array.astype(label_dtype_for(max(top, max(self.objects, default=0))))
