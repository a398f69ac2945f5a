"""Where does bf16's error in the image embedding come from? Emulated rounding, one place at a time.

The fp32 rewrite of the encoder (`FastTinyViT`) is run with bf16 rounding applied only at chosen
places (weights, matmul inputs, matmul outputs, layer norms, attention, GELU), and then with only
one group of weights rounded. The printed figure is the relative error of the embedding against
the model's own fp32 encoder, averaged over real slices of the shared CT and MR cases. It tells
whether keeping a few layers in fp32 could make bf16 accurate enough (it cannot: the error is
spread over every layer).

    python benchmarks/bf16_error_sources.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
CASES = ("ct_spleen_msd_spleen2_crop", "mr_abdomen_totalseg_sm", "mr_brain_edema_brats2021_01646",
         "mr_spinalcord_ivadomed_t2w")


def slices(image_size: int, normalization: str):
    """Three slices (a third, half, two thirds through) of each shared case, as model input."""
    import torch

    from medsam_plugin.engine.preprocessing import normalize_volume, slices_to_model_input
    from medsam_plugin.io import read_volume

    out = []
    for case in CASES:
        path = SHARED / case / "image.nii.gz"
        if not path.is_file():
            continue
        volume = read_volume(path)
        stack = normalize_volume(np.moveaxis(np.asarray(volume.data_ijk), -1, 0), "CT" if case.startswith("ct") else "MR")
        n = stack.shape[0]
        for z in (n // 3, n // 2, 2 * n // 3):
            out.append(slices_to_model_input(stack[[z]], image_size, normalization)[0])
    return torch.cat(out) if out else None


def main() -> int:
    import torch
    import torch.nn.functional as F

    from medsam_plugin.model.fast import FastTinyViT
    from medsam_plugin.model.registry import load_model

    loaded = load_model("lite_medsam", device="cpu")
    x = slices(int(loaded.spec.image_size), loaded.spec.normalization)
    if x is None:
        print(f"skipped: {SHARED} is absent (the team's shared labelled volumes).")
        return 0
    encoder = loaded.sam.image_encoder.eval()
    with torch.inference_mode():
        ref = torch.cat([encoder(x[i:i + 1]) for i in range(len(x))])
    fast = FastTinyViT(encoder).eval()

    def rel_error(model) -> float:
        with torch.inference_mode():
            out = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        return float(((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean())

    def r16(t):
        return None if t is None else t.to(torch.bfloat16).float()

    originals = {"linear": F.linear, "conv2d": F.conv2d, "scaled_dot_product_attention": F.scaled_dot_product_attention,
                 "layer_norm": F.layer_norm, "gelu": F.gelu}

    def rounded_at(places: set):
        w, a, o = "weights" in places, "matmul inputs" in places, "matmul outputs" in places

        def linear(t, weight, bias=None):
            y = originals["linear"](r16(t) if a else t, r16(weight) if w else weight, r16(bias) if w else bias)
            return r16(y) if o else y

        def conv2d(t, weight, bias=None, *args):
            y = originals["conv2d"](r16(t) if a else t, r16(weight) if w else weight, r16(bias) if w else bias, *args)
            return r16(y) if o else y

        def sdpa(q, k, v, attn_mask=None):
            if "attention" in places:
                q, k, v, attn_mask = r16(q), r16(k), r16(v), r16(attn_mask)
                return r16(originals["scaled_dot_product_attention"](q, k, v, attn_mask=attn_mask))
            return originals["scaled_dot_product_attention"](q, k, v, attn_mask=attn_mask)

        def layer_norm(t, shape, weight=None, bias=None, eps=1e-5):
            if "layer norms" in places:
                return r16(originals["layer_norm"](r16(t), shape, weight, bias, eps))
            return originals["layer_norm"](t, shape, weight, bias, eps)

        def gelu(t, *args, **kwargs):
            y = originals["gelu"](t, *args, **kwargs)
            return r16(y) if "gelu" in places else y

        patched = {"linear": linear, "conv2d": conv2d, "scaled_dot_product_attention": sdpa,
                   "layer_norm": layer_norm, "gelu": gelu}
        for name, fn in patched.items():
            setattr(F, name, fn)
        try:
            return rel_error(fast)
        finally:
            for name, fn in originals.items():
                setattr(F, name, fn)

    print(f"relative embedding error against fp32 eager, mean over {len(x)} slices of {len(CASES)} shared cases")
    print(f"  fp32 rewrite, no rounding: {rel_error(fast):.1e}")
    every = {"weights", "matmul inputs", "matmul outputs", "attention", "layer norms", "gelu"}
    for places in [{p} for p in sorted(every)] + [{"weights", "matmul inputs"}, every]:
        print(f"  bf16 rounding at {' + '.join(sorted(places)):55s} {rounded_at(places):.1e}", flush=True)

    merges = {i for i, m in enumerate(fast.stages) if type(m).__name__ == "_Merge"}
    mbconv = {i for i, m in enumerate(fast.stages) if type(m).__name__ == "_MBConv"}
    groups = {
        "patch embedding": lambda n: n.startswith("embed"),
        "stage 0 (MBConv)": lambda n: n.startswith("stages.") and int(n.split(".")[1]) in mbconv,
        "patch merging": lambda n: n.startswith("stages.") and int(n.split(".")[1]) in merges,
        "local 3x3 convs": lambda n: "local_conv" in n,
        "attention qkv": lambda n: ".qkv." in n, "attention proj": lambda n: ".proj." in n,
        "mlp fc1": lambda n: ".fc1." in n, "mlp fc2": lambda n: ".fc2." in n,
        "layer norms": lambda n: "norm" in n, "neck": lambda n: n.startswith("neck"),
    }
    print("  weights of one group only rounded to bf16 (BatchNorms folded in, as every fast path runs them):")
    for group, chosen in groups.items():
        model = copy.deepcopy(fast)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if chosen(name) and not name.endswith("bias"):
                    param.copy_(r16(param))
        print(f"    {group:18s} {rel_error(model):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
