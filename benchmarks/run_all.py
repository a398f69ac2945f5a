"""Every speed figure of the project from one command, each beside the fp32 eager baseline.

    python benchmarks/run_all.py            (or: make bench)
    python benchmarks/run_all.py --quick    (fewer repeats, no Dice check)

Sections: the machine; 1) encoder paths (fp32 eager, fp32 rewrite, torch bf16, OpenVINO f32/bf16)
and the one `make_encoder` picks, with Dice on every shared case (1b, also the fast mask decoder
against the model's own) and where the OpenVINO f32 path's time goes (1c); 2) re-prompt on a
cached slice vs encode + decode, with the model's decoder and the fast one; 3) whole-volume propagation vs the reference that re-encodes per prompt, and
objects sharing embeddings; 4) batched encoding and background precompute; 5) peak memory on a
synthetic 512x512x600 CT with a bounded cache; 6) GPU (only where one is present).

Timings are medians of variants run interleaved in one process, so a busy machine slows all of
them alike; the ratios are the figures to compare, the seconds depend on the load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "sample_data"
RESULTS: dict = {}


def say(text: str = "") -> None:
    print(text, flush=True)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Run each callable `repeats` times, round-robin; {name: {wall, cpu}} median seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n]), "all_wall": wall[n]} for n in fns}


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    import torch

    from medsam_plugin.model.fast import cpu_bf16_support, cpu_flags, cpu_model_name, openvino_available

    flags = cpu_flags()
    info = {
        "cpu": cpu_model_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                                  "amx_tile", "amx_int8")),
        "bf16_native": cpu_bf16_support(), "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
    }
    if openvino_available():
        from medsam_plugin.model.fast import import_openvino

        info["openvino"] = import_openvino().__version__  # never a bare `import openvino`: telemetry
    say("== machine")
    for k, v in info.items():
        say(f"  {k}: {v}")
    return info


# ------------------------------------------------------------------------------------------ 1 encoder
def bench_encoder(loaded, repeats: int) -> dict:
    import torch

    from medsam_plugin.model.fast import PATHS, build_path, choose_mode, openvino_available

    say("\n== 1. image encoder, one 256x256 slice (median of %d interleaved runs)" % repeats)
    chosen, why = choose_mode(loaded, "auto")
    names = [p for p in PATHS if not p.startswith("openvino") or openvino_available()]
    paths = {}
    for name in names:
        t0 = time.perf_counter()
        paths[name] = build_path(loaded, name)
        if name.startswith("openvino"):
            say(f"  {name}: ready in {time.perf_counter() - t0:.1f}s "
                f"({'converted from PyTorch, now cached as IR' if paths[name].converted else 'IR from cache'})")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    ref = paths["fp32"](x)
    err = {n: float((p(x) - ref).norm() / ref.norm()) for n, p in paths.items()}
    gemms = gemm_operands()
    fns = {n: (lambda p=p: p(x)) for n, p in paths.items()}
    fns.update({f"gemm-{dt}": (lambda a=a, b=b: torch.mm(a, b)) for dt, (a, b) in gemms.items()})
    t = interleaved(fns, repeats)
    peak = {dt: 2 * GEMM_N**3 / t[f"gemm-{dt}"]["wall"] / 1e9 for dt in gemms}
    peak.setdefault("bf16", peak["fp32"])  # emulated bf16 is no faster: the fp32 bound applies
    base = t["fp32"]
    say(f"  {'path':15s} {'wall s':>8s} {'x fp32':>7s} {'cpu s':>8s} {'x fp32':>7s}  rel. error of embedding")
    for n in paths:
        say(f"  {n:15s} {t[n]['wall']:8.3f} {base['wall'] / t[n]['wall']:7.2f} {t[n]['cpu']:8.3f} "
            f"{base['cpu'] / t[n]['cpu']:7.2f}  {err[n]:.2e}" + ("   <- auto" if n == chosen else ""))
    say(f"  auto picks {chosen}: {why}")
    ceiling = {dt: base["wall"] / (SLICE_FLOP / (peak[dt] * 1e9)) for dt in peak}
    say(f"  {chosen}: {SLICE_FLOP / t[chosen]['wall'] / 1e9:.0f} GFLOP/s effective ({SLICE_FLOP / 1e9:.0f} GFLOP a "
        f"slice) = {SLICE_FLOP / t[chosen]['wall'] / 1e9 / peak['fp32']:.0%} of this CPU's fp32 GEMM peak")
    say(f"  GEMM peak (torch, {GEMM_N}^3, {torch.get_num_threads()} threads): fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s")
    say(f"  ceiling of any path at that peak, as x fp32 eager: fp32 {ceiling['fp32']:.2f}, bf16 {ceiling['bf16']:.2f} "
        f"(a slice cannot take less than 75 GFLOP / peak)")
    alone = eager_alone(repeats)
    if alone:
        say(f"  cross-check: fp32 eager in a fresh process without OpenVINO loaded: {alone:.3f} s/slice "
            f"-> {chosen} {alone / t[chosen]['wall']:.2f}x (OpenVINO's worker threads share the 2 cores)")
    return {"times": t, "rel_error": err, "chosen": chosen, "reason": why,
            "speedup_wall": base["wall"] / t[chosen]["wall"], "speedup_cpu": base["cpu"] / t[chosen]["cpu"],
            "gemm_peak_gflops": peak, "ceiling": ceiling, "eager_alone_s": alone, "paths": paths}


EAGER_CHILD = r"""
import statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from medsam_plugin.model.registry import load_model
encoder = load_model("lite_medsam", device="cpu").sam.image_encoder
x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    encoder(x)
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter()
        encoder(x)
        times.append(time.perf_counter() - t0)
print("RESULT", statistics.median(times))
"""


def eager_alone(repeats: int) -> float | None:
    """Median seconds of the model's own fp32 encoder in a process that never loads OpenVINO."""
    proc = subprocess.run([sys.executable, "-c", EAGER_CHILD, str(REPO), str(repeats)], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return float(line[0].split()[1]) if line else None


# OpenVINO CPU node types, grouped by what bounds them.
_OV_GROUPS = {"FullyConnected": "matmul + dense conv", "Convolution": "matmul + dense conv", "MatMul": "matmul + dense conv",
              "GroupConvolution": "depthwise conv", "Subgraph": "attention (fused)",
              "Transpose": "data movement", "Reorder": "data movement", "VariadicSplit": "data movement",
              "Split": "data movement", "Pad": "data movement", "Slice": "data movement", "Concat": "data movement",
              "StridedSlice": "data movement", "Gather": "data movement"}


def profile_openvino(loaded, enc, repeats: int) -> dict | None:
    """Where the OpenVINO f32 path's time goes, and the floor it sets for any fp32 path.

    OpenVINO's own per-node counters (PERF_COUNT) over a real-sized input, grouped by node type.
    The floor assumes data movement, norms and element-wise work cost nothing and keeps only the
    arithmetic: the matmuls and dense convs at the rate they already run, the depthwise convs and
    the fused attention, plus the PyTorch patch embedding in front.
    """
    import torch

    from medsam_plugin.model.fast import import_openvino, openvino_available, openvino_ir_path

    path = enc["paths"].get("openvino-f32")
    if path is None or not openvino_available():
        return None
    ov = import_openvino()
    import copy

    say("\n== 1c. where openvino-f32's time goes (OpenVINO per-node counters, median of %d runs)" % repeats)
    encoder = copy.deepcopy(loaded.sam.image_encoder).float().eval()
    core = ov.Core()
    model = core.read_model(str(openvino_ir_path(encoder, int(loaded.spec.image_size))))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tokens = path.embed(x).numpy()
    request.infer({0: tokens})
    runs = []
    for _ in range(repeats):
        request.infer({0: tokens})
        groups: dict[str, float] = {}
        for node in request.get_profiling_info():
            group = _OV_GROUPS.get(node.node_type, "norms + element-wise")
            groups[group] = groups.get(group, 0.0) + node.real_time.total_seconds()
        runs.append(groups)
    names = sorted({g for r in runs for g in r})
    median = {g: statistics.median(r.get(g, 0.0) for r in runs) for g in names}
    total = sum(median.values())
    embed = interleaved({"embed": lambda: path.embed(x)}, repeats)["embed"]["wall"]
    for g in sorted(median, key=median.get, reverse=True):
        say(f"  {g:22s} {median[g] * 1000:7.1f} ms  {median[g] / total:6.1%}")
    say(f"  {'patch embedding (torch)':22s} {embed * 1000:7.1f} ms")
    gemm = median.get("matmul + dense conv", 0.0)
    gemm_flop = matmul_flop(loaded)
    floor = gemm + median.get("depthwise conv", 0.0) + median.get("attention (fused)", 0.0) + embed
    base = enc["times"]["fp32"]["wall"]
    say(f"  matmuls + dense convs ({gemm_flop / 1e9:.1f} of the 75 GFLOP) run at {gemm_flop / gemm / 1e9:.0f} GFLOP/s; "
        f"this CPU's fp32 GEMM peak measured {enc['gemm_peak_gflops']['fp32']:.0f}")
    say(f"  floor with no data movement, norms or element-wise cost at all: {floor * 1000:.0f} ms "
        f"= {base / floor:.2f}x fp32 eager ({base:.3f} s); at the GEMM peak as well: "
        f"{(gemm_flop / enc['gemm_peak_gflops']['fp32'] / 1e9 + floor - gemm) * 1000:.0f} ms "
        f"= {base / (gemm_flop / enc['gemm_peak_gflops']['fp32'] / 1e9 + floor - gemm):.2f}x")
    return {"groups_s": median, "total_s": total, "embed_s": embed, "floor_s": floor,
            "floor_x": base / floor}


SLICE_FLOP = 75e9  # FACTS.md: TinyViT encoder, one 256x256 slice


def matmul_flop(loaded) -> float:
    """FLOP of one slice outside the attention kernels (linears and convs), by torch's flop counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        loaded.sam.image_encoder(torch.zeros(1, 3, 256, 256))
    counts = counter.get_flop_counts().get("Global", {})
    # The eager model's attention (SDPA with a 3-D bias) is counted as bmm; OpenVINO fuses it.
    return float(sum(v for op, v in counts.items() if "attention" not in str(op) and "bmm" not in str(op)))
GEMM_N = 2048


def gemm_operands() -> dict:
    """Square matmul operands per dtype; their GFLOP/s bound any encoder path's arithmetic."""
    import torch

    from medsam_plugin.model.fast import cpu_bf16_support

    dtypes = {"fp32": torch.float32}
    if cpu_bf16_support()[0]:
        dtypes["bf16"] = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    return {n: (torch.randn(GEMM_N, GEMM_N, generator=gen).to(d), torch.randn(GEMM_N, GEMM_N, generator=gen).to(d))
            for n, d in dtypes.items()}


# ------------------------------------------------------------------------------------------ 2 re-prompt
def spleen_case():
    from medsam_plugin.engine.propagation import bounding_box_xyxy
    from medsam_plugin.io import read_labels, read_volume

    case = SAMPLE / "ct_spleen_msd_spleen2_crop"
    volume = read_volume(case / "image.nii.gz")
    truth_ijk = read_labels(case / "label.nii.gz", volume)
    return volume, truth_ijk, bounding_box_xyxy


def bench_reprompt(loaded, enc, repeats: int) -> dict:
    from medsam_plugin.engine.embedding_cache import EmbeddingCache
    from medsam_plugin.engine.predictor import SlicePredictor
    from medsam_plugin.engine.session import SegmentationSession

    say("\n== 2. re-prompt on a cached slice vs encode + decode (spleen sample, GT box)")
    volume, truth_ijk, bbox = spleen_case()
    session = SegmentationSession(volume, loaded_model=loaded)
    truth = session.view.to_view(truth_ijk) == 1
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    box = bbox(truth[z])
    fast_path = enc["paths"][enc["chosen"]]
    # fp32: the model as published (eager encoder, its own decoder); "fast": the engine's default
    # (auto encoder path, fast decoder); between them the auto encoder with the model's own decoder.
    preds = {"fp32": SlicePredictor(loaded, EmbeddingCache(), None, decoder="reference"),
             "fast-enc": SlicePredictor(loaded, EmbeddingCache(), fast_path, decoder="reference"),
             "fast": SlicePredictor(loaded, EmbeddingCache(), fast_path, decoder="fast")}
    for p in preds.values():
        p.set_volume(session.image_u8)

    def fresh(p):
        p.cache.reset()
        p.predict(z, box_xyxy=box)

    def again(p):
        p.predict(z, box_xyxy=box + np.array([1, 1, -1, -1], np.float32))

    full = interleaved({n: (lambda p=p: fresh(p)) for n, p in preds.items()}, max(2, repeats // 2))
    cached = interleaved({n: (lambda p=p: again(p)) for n, p in preds.items()}, repeats * 3)
    out = {}
    labels = {"fp32": "fp32 eager encoder, model's decoder", "fast-enc": f"{enc['chosen']}, model's decoder",
              "fast": f"{enc['chosen']}, fast decoder (default)"}
    for n in preds:
        out[n] = {"encode_decode": full[n]["wall"], "reprompt": cached[n]["wall"],
                  "fraction": cached[n]["wall"] / full[n]["wall"]}
        say(f"  {labels[n]:42s} encode+decode {full[n]['wall']:.3f}s, re-prompt {cached[n]['wall'] * 1000:.0f} ms "
            f"= {out[n]['fraction']:.3f} of encode+decode (target <= 0.1)")
    say(f"  fast decoder re-prompt vs the model's decoder: {cached['fast-enc']['wall'] / cached['fast']['wall']:.2f}x "
        f"faster; vs fp32 eager encode+decode: {cached['fast']['wall'] / full['fp32']['wall']:.3f}")
    return out


# ------------------------------------------------------------------------------------------ 3 propagation
class ReEncodingPredictor:
    """The reference approach (MedSAM's 3D script): every prompt encodes its slice again."""

    def __init__(self, predictor):
        self.inner = predictor

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def ensure_embedding(self, z):
        return False  # encoding happens in `predict`, every time (the walk's encode-first step must not add one)

    def predict(self, z, **kwargs):
        self.inner.cache.reset()
        return self.inner.predict(z, **kwargs)


def bench_propagation(loaded, enc) -> dict:
    import torch

    from medsam_plugin.engine.embedding_cache import EmbeddingCache
    from medsam_plugin.engine.predictor import SlicePredictor
    from medsam_plugin.engine.propagation import bounding_box_xyxy, propagate, run_to_completion
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    say("\n== 3. whole-volume propagation vs re-encoding every slice for every prompt")
    path = enc["paths"][enc["chosen"]]
    volume, truth_ijk, _ = spleen_case()
    session = SegmentationSession(volume, loaded_model=loaded)
    truth = session.view.to_view(truth_ijk) == 1
    z0 = int(np.argmax(truth.sum(axis=(1, 2))))

    def one_object(predictor):
        seed = predictor.predict(z0, box_xyxy=bounding_box_xyxy(truth[z0]))
        return run_to_completion(propagate(predictor, {z0: seed}))

    def timed(reencode: bool):
        predictor = SlicePredictor(loaded, EmbeddingCache(), path)
        predictor.set_volume(session.image_u8)
        t0 = time.perf_counter()
        out = one_object(ReEncodingPredictor(predictor) if reencode else predictor)
        return time.perf_counter() - t0, predictor, out

    path(torch.zeros(1, 3, 256, 256))  # warm: the first call of a path allocates its buffers
    runs = {"engine": [], "reference": []}
    for _ in range(2):  # alternated, best of two: both runs see the same machine state
        runs["engine"].append(timed(False))
        runs["reference"].append(timed(True))
    t_engine, engine, result = min(runs["engine"], key=lambda r: r[0])
    t_ref, ref_inner, _ = min(runs["reference"], key=lambda r: r[0])
    prompts, unique = engine.decode_count, engine.encode_count
    say(f"  one object (spleen): {prompts} prompts on {unique} unique slices ({len(result.slices)} kept)")
    say(f"    engine (cached, {enc['chosen']}): {t_engine:.1f}s; reference (re-encode per prompt, same encoder): "
        f"{t_ref:.1f}s; ratio {t_ref / t_engine:.2f} (target >= prompts/unique = {prompts / unique:.2f})")
    fp32_slice = enc["times"]["fp32"]["wall"]
    say(f"    reference with fp32 eager encoder (prompts x measured fp32 encode): ~{prompts * fp32_slice:.1f}s "
        f"-> engine is {prompts * fp32_slice / t_engine:.1f}x faster")

    # Several objects and correction clicks on one scan: a multi-label sample case.
    case = SAMPLE / "ct_abdomen_totalseg_sm"
    vol2 = read_volume(case / "image.nii.gz")
    lab2 = read_labels(case / "label.nii.gz", vol2)
    from medsam_plugin.evaluation.simulate import simulate_object

    def objects_with_clicks(reencode: bool):
        session2 = SegmentationSession(vol2, loaded_model=loaded)
        predictor = session2.predictor
        if reencode:  # the reference: every prompt encodes its slice again
            inner = predictor.predict

            def predict(z, **kwargs):
                predictor.cache.reset()
                return inner(z, **kwargs)

            predictor.predict = predict
        truth2 = session2.view.to_view(lab2)
        t0 = time.perf_counter()
        for label in labels3:
            simulate_object(session2, truth2 == label, label, clicks=1)
        return time.perf_counter() - t0, predictor

    os.environ["MEDSAM_ENCODER"] = enc["chosen"]
    try:
        truth_all = SegmentationSession(vol2, loaded_model=loaded).view.to_view(lab2)
        present = [int(v) for v in np.unique(truth_all) if v]
        labels3 = sorted(present, key=lambda v: -int((truth_all == v).sum()))[:3]
        t_multi, p2 = objects_with_clicks(reencode=False)
        t_multi_ref, p2_ref = objects_with_clicks(reencode=True)
    finally:
        os.environ.pop("MEDSAM_ENCODER", None)
    prompts2, unique2 = p2.decode_count, p2.encode_count
    say(f"  {len(labels3)} objects + 1 correction click each (abdomen sample, labels {labels3}): "
        f"{prompts2} prompts on {unique2} unique slices")
    say(f"    engine {t_multi:.1f}s; reference (re-encode per prompt, {p2_ref.encode_count} encodes for "
        f"{p2_ref.decode_count} prompts) {t_multi_ref:.1f}s; ratio {t_multi_ref / t_multi:.2f} "
        f"(prompts/unique = {prompts2 / max(1, unique2):.2f})")
    # A cache saves encodes, not decodes: with E = encode and D = decode time, the best possible
    # ratio is P(E + D) / (U E + P D), just under P/U.
    return {"one_object": {"prompts": prompts, "unique": unique, "engine_s": t_engine, "reference_s": t_ref},
            "multi": {"prompts": prompts2, "unique": unique2, "engine_s": t_multi, "reference_s": t_multi_ref,
                      "reference_prompts": p2_ref.decode_count}}


# ------------------------------------------------------------------------------------------ 4 batching
def bench_batching(loaded, enc, repeats: int) -> dict:
    import torch

    from medsam_plugin.engine.embedding_cache import EmbeddingCache
    from medsam_plugin.engine.predictor import SlicePredictor
    from medsam_plugin.engine.session import SegmentationSession

    say("\n== 4. batched encoding (seconds per slice) and background precompute")
    out = {}
    torch.manual_seed(0)
    batches = (1, 2, 4, 8)
    for name in dict.fromkeys([enc["chosen"], "bf16" if "bf16" in enc["paths"] else "fp32-fast"]):
        path = enc["paths"][name]
        xs = {b: torch.rand(b, 3, 256, 256) for b in batches}
        t = interleaved({b: (lambda b=b: path(xs[b])) for b in batches}, repeats, warmup=1)
        per = {b: t[b]["wall"] / b for b in batches}
        out[name] = per
        best = min(per, key=per.get)
        say(f"  {name:14s} " + "  ".join(f"b{b}: {per[b]:.3f}" for b in batches)
            + f"   best b{best} ({per[1] / per[best]:.2f}x of b1)")
    say(f"  fp32 eager baseline b1: {enc['times']['fp32']['wall']:.3f} s/slice")
    say(f"  precompute(batch_size=None) uses the path's preferred batch: "
        f"{enc['paths'][enc['chosen']].preferred_batch} here (8 on CUDA, 1 on the CPU)")

    # Background precompute while the user keeps prompting a cached slice.
    volume, truth_ijk, bbox = spleen_case()
    session = SegmentationSession(volume, loaded_model=loaded)
    truth = session.view.to_view(truth_ijk) == 1
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    predictor = SlicePredictor(loaded, EmbeddingCache(), enc["paths"][enc["chosen"]])
    predictor.set_volume(session.image_u8)
    predictor.predict(z, box_xyxy=bbox(truth[z]))
    todo = [k for k in range(max(0, z - 4), min(predictor.n_slices, z + 5)) if k != z]
    worker = threading.Thread(target=lambda: [None for _ in predictor.precompute(todo)], daemon=True)
    t0 = time.perf_counter()
    worker.start()
    lat = []
    while worker.is_alive():
        s = time.perf_counter()
        predictor.predict(z, box_xyxy=bbox(truth[z]))
        lat.append(time.perf_counter() - s)
    worker.join()
    t_bg = time.perf_counter() - t0
    say(f"  background precompute of {len(todo)} slices: {t_bg:.1f}s, meanwhile {len(lat)} re-prompts on a cached "
        f"slice answered in median {statistics.median(lat) * 1000 if lat else float('nan'):.0f} ms")
    out["background"] = {"slices": len(todo), "seconds": t_bg, "reprompts": len(lat),
                         "median_reprompt_s": statistics.median(lat) if lat else None}
    return out


# ------------------------------------------------------------------------------------------ 5 memory
MEMORY_CHILD = r'''
import json, os, resource, sys, tempfile, time
import numpy as np
sys.path.insert(0, sys.argv[1])
mode, span = sys.argv[2], int(sys.argv[3])
def rss_mb():
    # VmHWM: this process's own peak. ru_maxrss is not reset by exec on Linux, so it would
    # report the parent benchmark's peak instead.
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from medsam_plugin.io.volume import Volume
from medsam_plugin.engine.session import SegmentationSession
from medsam_plugin.engine.propagation import StopRules, bounding_box_xyxy, run_to_completion
from medsam_plugin.model.registry import load_model
os.environ["MEDSAM_ENCODER"] = mode
loaded = load_model("lite_medsam", device="cpu")
after_model = rss_mb()
Z, H, W = 600, 512, 512
rng = np.random.default_rng(0)
data = np.full((W, H, Z), -900, np.int16)            # i, j, k = x, y, z
data += rng.integers(0, 40, size=(1, H, Z), dtype=np.int16)  # faint texture, cheap to make
zz, yy, xx = 300, 256, 256
radius_xy, half = 60.0, span / 2
for k in range(int(zz - half) - 1, int(zz + half) + 2):
    r2 = radius_xy**2 * max(0.0, 1 - ((k - zz) / half) ** 2)
    if r2 <= 0: continue
    y, x = np.ogrid[:H, :W]
    data[:, :, k][((x - xx) ** 2 + (y - yy) ** 2 <= r2).T] = 60
affine = np.diag([0.8, 0.8, 1.0, 1.0])
volume = Volume(data_ijk=data, affine_ras=affine, modality="CT") if "modality" in Volume.__dataclass_fields__ else Volume(data_ijk=data, affine_ras=affine)
after_volume = rss_mb()
cache_dir = tempfile.mkdtemp(prefix="medsam_mem_")
cache_bytes = 32 * 1024**2   # 16 fp16 embeddings in memory, the rest spills to disk
session = SegmentationSession(volume, loaded_model=loaded, cache_dir=cache_dir, cache_bytes=cache_bytes)
obj = session.add_object("sphere")
mid = session.shape_zyx[0] // 2
img = session.image_u8[mid]
mask = img > img.mean() + 30
t0 = time.perf_counter()
session.segment_slice(obj.label_id, mid, box_xyxy=bounding_box_xyxy(mask))
session.stop_rules = StopRules(z_range=(mid - int(half) - 6, mid + int(half) + 6))
run_to_completion(session.propagate(obj.label_id, stop=session.stop_rules))
secs = time.perf_counter() - t0
p = session.predictor
out = {"shape_zyx": list(session.shape_zyx), "volume_mb": data.nbytes / 2**20, "rss_after_model_mb": after_model,
       "rss_after_volume_mb": after_volume, "peak_rss_mb": rss_mb(), "slices_encoded": p.encode_count,
       "slices_segmented": int((session.labels.array == obj.label_id).any(axis=(1, 2)).sum()),
       "cache_bytes_in_memory": p.cache.bytes_in_memory, "cache_limit": cache_bytes,
       "disk_files": len(os.listdir(cache_dir)), "seconds": secs}
print("RESULT " + json.dumps(out))
'''


def bench_memory(enc, span: int) -> dict:
    say(f"\n== 5. memory: synthetic 512x512x600 CT, one sphere-like object over ~{span} slices, "
        f"cache 32 MiB in memory + disk spill (separate process, peak RSS)")
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(REPO), enc["chosen"], str(span)],
                          capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        say("  failed:\n" + proc.stderr[-3000:])
        return {"error": proc.stderr[-3000:]}
    r = json.loads(line[0][7:])
    say(f"  volume {r['shape_zyx']} int16 = {r['volume_mb']:.0f} MiB; RSS after model {r['rss_after_model_mb']:.0f} MiB, "
        f"after volume {r['rss_after_volume_mb']:.0f} MiB, peak {r['peak_rss_mb']:.0f} MiB")
    say(f"  {r['slices_encoded']} slices encoded for {r['slices_segmented']} segmented (of 600) in {r['seconds']:.0f}s; "
        f"cache in memory {r['cache_bytes_in_memory'] / 2**20:.0f} MiB (limit {r['cache_limit'] / 2**20:.0f} MiB), "
        f"{r['disk_files']} embeddings spilled to disk")
    say(f"  all 600 embeddings in fp32 would take {600 * 4 * 2**20 / 2**30:.1f} GiB; fp16 unbounded 1.2 GiB")
    return r


# ------------------------------------------------------------------------------------------ 6 gpu
def bench_gpu(loaded_cpu) -> dict:
    import torch

    say("\n== 6. GPU")
    if not torch.cuda.is_available():
        say("  no CUDA device on this machine: GPU throughput not measured. The CUDA path (bf16 rewrite, "
            "batch 8) is exercised on CPU by the tests only.")
        return {"measured": False}
    from medsam_plugin.model.fast import build_path
    from medsam_plugin.model.registry import load_model

    loaded = load_model("lite_medsam", device="cuda")
    out = {"device": torch.cuda.get_device_name(0)}
    for name in ("fp32", "bf16"):
        path = build_path(loaded, name)
        for b in (1, 8, 32):
            x = torch.rand(b, 3, 256, 256, device="cuda")
            for _ in range(3):
                path(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                path(x)
            torch.cuda.synchronize()
            sps = 10 * b / (time.perf_counter() - t0)
            out[f"{name}_b{b}"] = sps
            say(f"  {name} batch {b}: {sps:.1f} slices/s = {sps * SLICE_FLOP / 1e12:.1f} TFLOP/s effective")
    peak = gpu_bf16_peak_tflops(out["device"])
    best = max(out[f"bf16_b{b}"] for b in (1, 8, 32))
    share = f"{best * SLICE_FLOP / 1e12 / peak:.1%} of its {peak:.0f} TFLOP/s bf16 peak" if peak else \
        "bf16 peak unknown for this device (set MEDSAM_GPU_BF16_TFLOPS)"
    out["summary"] = f"{out['device']}: bf16 {best:.0f} slices/s = {share}; fp32 b1 {out['fp32_b1']:.0f}/s"
    say("  " + out["summary"])
    return out


# Dense bf16 tensor-core peaks from the vendor's data sheets, TFLOP/s (no sparsity).
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                        "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def gpu_bf16_peak_tflops(name: str) -> float | None:
    override = os.environ.get("MEDSAM_GPU_BF16_TFLOPS")
    if override:
        return float(override)
    for key, value in GPU_BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def summary(enc) -> None:
    """One line per target of the speed issue: baseline, measured, met or not."""
    say("\n== summary (each beside its baseline, all from this run)")
    t = enc["times"]
    base = t["fp32"]["wall"]
    rows = []
    dice = RESULTS.get("dice") or {}
    chosen_rows = dice.get(enc["chosen"]) or []
    worst = max((abs(r["delta"]) for r in chosen_rows), default=None)
    met1 = enc["speedup_wall"] >= 4 and worst is not None and worst <= 0.005
    prof = RESULTS.get("openvino_profile")
    bound = f"fp32 floor {prof['floor_x']:.2f}x" if prof else f"fp32 ceiling {enc['ceiling']['fp32']:.2f}x"
    rows.append(("1 encoder, auto = " + enc["chosen"], f"fp32 eager {base:.3f} s/slice",
                 f"{enc['speedup_wall']:.2f}x ({bound}), Dice worst "
                 + (f"{worst:.4f}" if worst is not None else "not checked"), "4x, Dice 0.005", met1))
    for name, rows_b in dice.items():
        if name == enc["chosen"] or not rows_b:
            continue
        w = max(abs(r["delta"]) for r in rows_b)
        sp = base / t[name]["wall"]
        rows.append((f"1 encoder, {name} (opt-in)", f"fp32 eager {base:.3f} s/slice",
                     f"{sp:.2f}x, Dice worst {w:.4f}", "4x, Dice 0.005", sp >= 4 and w <= 0.005))
    dec_rows = RESULTS.get("dice_decoder") or []
    if dec_rows:
        w = max(abs(r["delta"]) for r in dec_rows)
        rows.append(("2 fast decoder vs model's decoder", "Dice, model's decoder", f"Dice worst {w:.4f}",
                     "Dice 0.005", w <= 0.005))
    rp = RESULTS.get("reprompt", {}).get("fast")
    if rp:
        rows.append(("2 re-prompt, cached slice", f"encode+decode {rp['encode_decode']:.3f} s",
                     f"{rp['reprompt'] * 1000:.0f} ms = {rp['fraction']:.3f} of it", "<= 0.1", rp["fraction"] <= 0.1))
    prop = RESULTS.get("propagation")
    if prop:
        rp_fast = RESULTS.get("reprompt", {}).get("fast")
        for what, r in (("3 one object, spleen", prop["one_object"]), ("3 three objects + clicks", prop["multi"])):
            ratio, need = r["reference_s"] / r["engine_s"], r["prompts"] / max(1, r["unique"])
            bound = ""
            if rp_fast:  # the best a cache can do: P(E + D) / (U E + P D)
                e_plus_d, d = rp_fast["encode_decode"], rp_fast["reprompt"]
                best = r["prompts"] * e_plus_d / (r["unique"] * (e_plus_d - d) + r["prompts"] * d)
                bound = f", bound {best:.2f}"
            rows.append((what, f"re-encode per prompt {r['reference_s']:.1f} s",
                         f"{r['engine_s']:.1f} s = {ratio:.2f}x{bound}", f">= P/U = {need:.2f}", ratio >= need))
    bat = RESULTS.get("batching", {}).get(enc["chosen"])
    if bat:
        b = enc["paths"][enc["chosen"]].preferred_batch
        rows.append(("4 batched encoding, " + enc["chosen"], f"batch 1 {bat[1]:.3f} s/slice",
                     f"batch {b}: {bat[b]:.3f} s/slice ({bat[1] / bat[b]:.2f}x)", "batch where faster",
                     bat[b] <= min(bat.values()) * 1.05))
    mem = RESULTS.get("memory")
    if mem and "peak_rss_mb" in mem:
        rows.append(("5 512x512x600 CT", "all embeddings fp16: 1.2 GiB", f"peak RSS {mem['peak_rss_mb'] / 1024:.2f} GiB, "
                     f"cache {mem['cache_bytes_in_memory'] / 2**20:.0f} MiB", "bounded",
                     mem["cache_bytes_in_memory"] <= mem["cache_limit"]))
    gpu = RESULTS.get("gpu") or {}
    rows.append(("6 GPU bf16 throughput", "-", gpu.get("summary", "no GPU on this machine: not measured"),
                 "slices/s, % of peak", None))
    for what, baseline, measured, target, ok in rows:
        verdict = "n/a" if ok is None else ("met" if ok else "NOT MET")
        say(f"  {what:34s} | {baseline:34s} | {measured:58s} | {target:18s} | {verdict}")


def main(argv=None) -> int:
    import logging

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no Dice check on the shared cases")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-dice", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--span", type=int, default=40, help="slices the synthetic object spans (section 5)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    repeats = args.repeats or (3 if args.quick else 5)
    t_start = time.perf_counter()
    from medsam_plugin.model.registry import load_model

    RESULTS["machine"] = machine()
    loaded = load_model("lite_medsam", device="cpu")
    enc = bench_encoder(loaded, repeats)
    RESULTS["openvino_profile"] = profile_openvino(loaded, enc, repeats)
    if not (args.quick or args.skip_dice):
        sys.path.insert(0, str(Path(__file__).parent))
        import check_dice

        RESULTS["dice"] = {}
        # The auto choice, and the fastest bf16 path: it shows why bf16 stays opt-in.
        fastest_bf16 = next((n for n in ("openvino-bf16", "bf16") if n in enc["paths"]), None)
        for name in dict.fromkeys([enc["chosen"], fastest_bf16]):
            if name is None:
                continue
            say("\n== 1b. Dice, one-box propagation, fp32 eager vs %s (target |delta| <= 0.005)" % name)
            rows = check_dice.run(name, loaded=loaded, log=say)
            if rows:
                worst = max(abs(r["delta"]) for r in rows)
                say(f"  worst |delta| {worst:.4f} over {len(rows)} objects: "
                    f"{'ok' if worst <= 0.005 else 'OVER TOLERANCE'}")
            RESULTS["dice"][name] = rows
        say("\n== 1b. Dice, one-box propagation, the model's own mask decoder vs the fast decoder "
            "(%s embeddings)" % enc["chosen"])
        rows = check_dice.run(enc["chosen"], loaded=loaded, log=say, compare_decoders=True)
        if rows:
            say(f"  worst |delta| {max(abs(r['delta']) for r in rows):.4f} over {len(rows)} objects")
        RESULTS["dice_decoder"] = rows
    RESULTS["reprompt"] = bench_reprompt(loaded, enc, repeats)
    RESULTS["propagation"] = bench_propagation(loaded, enc)
    RESULTS["batching"] = bench_batching(loaded, enc, max(2, repeats // 2))
    if not args.skip_memory:
        RESULTS["memory"] = bench_memory(enc, args.span)
    RESULTS["gpu"] = bench_gpu(loaded)
    RESULTS["encoder"] = {k: v for k, v in enc.items() if k != "paths"}
    summary(enc)
    say(f"\nall done in {time.perf_counter() - t_start:.0f}s; load average now {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
