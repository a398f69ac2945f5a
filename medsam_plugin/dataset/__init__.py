"""A folder of scans annotated case by case, and what is made from it (Qt-free).

- `store`: `Dataset`, the worklist: cases, status (todo, in_progress, done, skipped), saving a
  case's label map, prompts and brush edits into a Decathlon layout (``dataset.json``,
  ``labelsTr/``) atomically and under a lock shared by processes.
- `replay`: the prompts file and brush-edits sidecar that rebuild a label map
  (``medsam-plugin segment --prompts``).
- `batch`: ``medsam-plugin segment --datalist``: every case with saved prompts, sharded under torchrun.
- `train`: fine-tuning on the done cases in a child process (progress, cancel, resume).

The napari Dataset panel (`medsam_plugin.napari.dataset_widget`) is an adapter over these.
"""

from .store import STATUSES, Case, Dataset, DatasetError, work_fingerprint

__all__ = ["Dataset", "Case", "DatasetError", "STATUSES", "work_fingerprint"]
