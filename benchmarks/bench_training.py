"""Training throughput in samples per second: cached slice embeddings vs. re-encoding every step.

    .venv/bin/python benchmarks/bench_training.py [--samples 32] [--batch-size 8] [--device cpu]

Both runs train the prompt encoder + mask decoder (``--train decoder``) on the same tiny datalist
cut from sample_data with the same prompt recipes; the only difference is whether the frozen
encoder's output is computed once (cached, the default) or inside every step. The time to fill
the cache is printed separately (it is paid once per dataset, and not at all on a re-run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_datalist(root: Path) -> Path:
    items = []
    for case, zs, keep in (("ct_spleen_msd_spleen2_crop", slice(6, 16), [1]), ("ct_abdomen_totalseg_sm", slice(10, 20), [1, 5])):
        (root / case).mkdir(parents=True, exist_ok=True)
        image = nib.load(REPO / "sample_data" / case / "image.nii.gz")
        label = nib.load(REPO / "sample_data" / case / "label.nii.gz")
        nib.save(image.slicer[:, :, zs], root / case / "image.nii.gz")
        lab = label.slicer[:, :, zs]
        arr = np.asarray(lab.dataobj).astype(np.uint8)
        arr[~np.isin(arr, keep)] = 0
        nib.save(nib.Nifti1Image(arr, lab.affine), root / case / "label.nii.gz")
        items.append({"image": f"{case}/image.nii.gz", "label": f"{case}/label.nii.gz", "modality": "CT"})
    path = root / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "spleen", "5": "liver"}, "training": items}))
    return path


def main() -> int:
    import torch

    from medsam_plugin.training.trainer import FinetuneConfig, finetune

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=32, help="training samples per measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datalist = make_datalist(tmp / "data")
        results = {}
        for name, cached in (("cached embeddings", True), ("re-encode each step", False)):
            t0 = time.perf_counter()
            res = finetune(FinetuneConfig(
                datalist=str(datalist), out=str(tmp / f"{cached}.pth"), cache_embeddings=cached, epochs=1,
                batch_size=args.batch_size, samples_per_epoch=args.samples, max_val_pairs=1, device=args.device,
                progress=False, cache_dir=str(tmp / "emb") if cached else None), log_fn=lambda s: None)
            train = res["history"][-1]["train"]
            results[name] = (train["samples_per_s"], train["samples"], train["seconds"], time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch {args.batch_size}")
    print(f"{'':<22} {'samples/s':>10} {'samples':>8} {'train s':>8} {'total s':>8}")
    for name, (sps, n, sec, total) in results.items():
        print(f"{name:<22} {sps:10.3f} {n:8d} {sec:8.1f} {total:8.1f}")
    a, b = results["cached embeddings"][0], results["re-encode each step"][0]
    print(f"speed-up of caching: {a / b:.1f}x  (total s of the cached run includes encoding the slices once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
