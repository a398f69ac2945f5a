"""SAM-style interactive fine-tuning: a model that answers a box, a click, a corrective click and the
previous slice's mask.

`train_interactive(InteractiveConfig(...))` is the Python API behind
``medsam-plugin finetune --objective interactive``. The image encoder stays frozen; the prompt
encoder and mask decoder train on embeddings computed once per (augmented) slice:

1. **Slice bank.** Every case of the datalist is read through the MONAI chain of
   `data.case_transforms` in each slicing view (axial, coronal, sagittal) and, for CT, several
   windows (a lung or bone window of a CT slice is a new image). `augment.SliceAugment` makes
   random copies (flips, 90-degree turns, zoom/crop, gamma/contrast), applied alike to a slice, its
   label and its two neighbours' labels. Each augmented slice is encoded once, through the engine's
   encode path and its self-checking disk cache (keyed by pixels, model and encoder path), so a
   resumed run encodes nothing again.
2. **Samples.** (slice, object) with the object on the slice, and (slice, object) where the
   object ends: its neighbour holds it, the slice does not (an empty target: the model learns to
   answer "nothing here" to a dense prompt past the object's end).
3. **Episodes.** A step draws one start for its batch (see `STARTS`): the expert's jittered box;
   one foreground click (single output by default; `click_multimask` trains SAM's three candidates
   with the loss on the best one instead); the neighbour's mask as a dense prompt, alone or with the box
   propagation gives. Then up to `max_rounds` corrective rounds, each adding a click at the centre
   of the largest error region of the previous round's mask and feeding that round's low-res
   logits back as the dense prompt. Loss on every round: DiceCE + MSE of the IoU head.
4. **The box path is kept.** On box starts the stock model's logits are distilled (soft BCE) next
   to the ground truth, so the new model does not drift from the box answers it started with.

Frames: everything here is in the 256x256 model-input frame of LiteMedSAM (slice resized so its
longest side is 256, top-left, zero padding), which is also the frame of the low-res logits.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.propagation import bounding_box_xyxy as _box_xyxy  # the engine's box rule, in the 256 frame here
from ..views import VIEWS
from .augment import SliceAugment, label_to_lowres
from .data import case_transforms, data_errors, load_datalist

log = logging.getLogger(__name__)

# start -> sampling weight for a step's batch
STARTS: dict[str, float] = {
    "box": 0.20,        # the expert's box (jittered ground-truth box)
    "click": 0.35,      # one foreground click inside the object
    "mask": 0.20,       # the neighbour slice's mask as a dense prompt (mask propagation)
    "box+mask": 0.25,   # the propagation box (neighbour's box + 3 px) and the neighbour's mask
}
END_STARTS = ("mask", "box+mask")  # what a walk past an object's end gives the empty slice
LOWRES = 256
PROP_BOX_MARGIN = 3.0  # engine/propagation.py BOX_MARGIN_256: the propagation box's widening
CT_WINDOWS = ("abdomen", "lung", "bone", "brain")
MAX_ASPECT = 3.0  # views whose slices are longer than this times their width are skipped


@dataclass
class InteractiveConfig:
    """Settings of one interactive fine-tuning run (CLI: ``medsam-plugin finetune --objective interactive``)."""

    datalist: str
    out: str
    data_root: str | None = None
    base_model: str = "lite_medsam"
    views: tuple[str, ...] = VIEWS
    ct_windows: tuple[str, ...] = CT_WINDOWS
    variants: int = 4                 # augmented copies per (case, view, window), besides the plain one
    slices_per_variant: int = 24      # slices encoded per copy (the ones holding most objects kept first)
    synthetic_slices: int = 0         # slices per (case, view, window) with a painted lesion (training/synthetic.py)
    synthetic_share: float = 0.35     # share of object draws that go to painted lesions (when there are any)
    min_area: int = 16                # pixels (256 frame) of an object for a slice to count
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-4
    prompt_encoder_lr_scale: float = 10.0  # see InteractiveTrainer.setup
    click_multimask: bool = False        # SAM's three candidates for a lone click (see run_episode)
    area_weight_power: float = 0.5       # object draws ~ area ** this (see setup)
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    max_rounds: int = 6
    distill_weight: float = 0.5
    iou_weight: float = 1.0
    starts: dict[str, float] = field(default_factory=lambda: dict(STARTS))
    chain_share: float = 0.0          # share of steps that walk slices on the model's own answers (run_chain)
    chain_length: int = 4             # slices a chain walks past its seed at most
    outward_share: float = 0.8        # chains that walk away from the object's largest slice
    end_chain_share: float = 0.0      # chains that start within chain_length slices of an end and walk past it
    far_prompt_share: float = 0.0     # mask starts whose dense prompt is a slice 2..far_prompt_reach away (make_episode)
    far_prompt_reach: int = 5
    keep_checkpoints: bool = False    # also write OUT_stepN.pth at every validation (choose by 3D walks later)
    stop_policy: str | None = None    # engine.propagation.POLICIES name written into the checkpoint's meta
    empty_weight: float = 1.0         # the leak term on targets past an object's end (seg_loss)
    teacher_model: str | None = None  # whose box answers are distilled (default: the model trained from)
    val_every: int = 100
    validation_datalist: str | None = None   # default: the datalist's own "validation" list
    val_slices_per_object: int = 3
    max_minutes: float | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = False                # autocast the decoder in bfloat16 (fast on CPUs with AMX)
    threads: int | None = None
    cache_dir: str | None = None
    fp16_weights: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.starts if s not in STARTS]
        if unknown:
            raise ValueError(f"Unknown start(s) {unknown}; known: {', '.join(STARTS)}.")
        if self.max_rounds < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be positive and max_rounds not negative.")
        if self.stop_policy is not None:
            from ..engine.propagation import POLICIES

            if self.stop_policy not in POLICIES:
                raise ValueError(f"Unknown stop policy {self.stop_policy!r}; known: {', '.join(POLICIES)}.")


# ---------------------------------------------------------------------------------- slice bank
@dataclass
class BankSlice:
    """One encoded (augmented) slice: embedding (256, 64, 64) float16 and labels in the 256 frame
    (uint16 (256, 256)) of the slice and of its neighbours below and above (zeros off the volume)."""

    embedding: np.ndarray
    label: np.ndarray
    neighbours: tuple[np.ndarray, np.ndarray]
    case: str
    view: str
    copy: int = -1   # which (case, view, window, augmentation) copy the slice belongs to
    z: int = -1      # its slice index in that copy: chain episodes walk copy-mates z -> z +/- 1


def _objects_in(label_256: np.ndarray, min_area: int) -> dict[int, int]:
    """{object: pixels} of the objects with at least `min_area` pixels on a label slice."""
    values, counts = np.unique(label_256, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0 and c >= min_area}


def build_bank(cases: Sequence[dict], loaded, cfg: InteractiveConfig, rng: np.random.Generator,
               augment: bool = True, say=print) -> list[BankSlice]:
    """Encode the slices training visits (see the module docstring); deterministic for a seed."""
    from ..engine.embedding_cache import cached_embeddings
    from .trainer import default_cache_dir, slice_encoder  # the engine's encode path and embedding cache

    encode, key = slice_encoder(loaded)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray], str, str, int, int]] = []
    n_copies = 0
    for case in cases:
        modality = str(case.get("modality", "auto")).upper()
        # A datalist entry may set its own bank: "all_slices" keeps every slice holding or ending an
        # object (a lesion walk needs its consecutive slices), "variants" and "ct_windows" its copies.
        own = case.get("bank") or {}
        all_slices = bool(own.get("all_slices", False))
        n_variants = int(own.get("variants", cfg.variants))
        windows = list(own.get("ct_windows", cfg.ct_windows)) if modality == "CT" else [None]
        for view in [v for v in cfg.views if v in own.get("views", cfg.views)]:
            for window in windows:
                with data_errors():
                    item = case_transforms(view, window, 1, None)(dict(case))
                image, label = item["image"], item["label"]
                n = image.shape[0]
                if max(image.shape[1:]) > MAX_ASPECT * min(image.shape[1:]):
                    break  # a thick-slice scan cut across its slices: a smear, not an image users see
                copies = [SliceAugment.identity()]
                if augment:
                    copies += [SliceAugment.random(rng, modality) for _ in range(n_variants)]
                if window not in (None, "abdomen") and augment:
                    copies = copies[: max(1, len(copies) // 2)]  # other windows: fewer copies
                for aug in copies:
                    n_copies += 1
                    rows = []
                    # Band banks reach `past_end` slices beyond an object (a walk that leaks one
                    # slice past the end must still learn to answer nothing on the next).
                    past = int(own.get("past_end", 1)) if all_slices and own.get("band") else 1
                    for z in range(n):
                        lab = label_to_lowres(aug.apply_label(label[z]))
                        objs = _objects_in(lab, cfg.min_area)
                        near = [zz for zz in range(z - past, z + past + 1) if zz != z and 0 <= zz < n]
                        ends = [v for v in np.unique(label[near]) if v != 0 and v not in objs]
                        if objs or ends:
                            rows.append((len(objs) + 0.5 * len(ends) + rng.uniform(0, 0.1), z, lab))
                    rows.sort(key=lambda row: row[:2], reverse=True)
                    if all_slices and own.get("band"):
                        rows = _band_rows(rows, label, int(own["band"]), past)
                    for _, z, lab in (rows if all_slices else rows[: cfg.slices_per_variant]):
                        img = aug.apply_image(image[z])
                        nb = tuple(label_to_lowres(aug.apply_label(label[zz])) if 0 <= zz < n
                                   else np.zeros((LOWRES, LOWRES), np.uint16) for zz in (z - 1, z + 1))
                        plan.append((img, lab, nb, str(case["case"]), view, n_copies, int(z)))
                if augment and cfg.synthetic_slices:
                    from .synthetic import lesion_slices

                    plan += [(img, lab, nb, str(case["case"]) + " (synthetic lesion)", view, -1, -1) for img, lab, nb in
                             lesion_slices(image, label, cfg.synthetic_slices, rng, modality, cfg.min_area)]
    say(f"slice bank: {len(plan)} slices from {len(cases)} case(s) (views {', '.join(cfg.views)})")
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="encoding slices", unit="slice", file=sys.stderr, leave=False)
    embeddings = cached_embeddings([p[0] for p in plan], encode, key, cache_dir,
                                   progress=(lambda k, total: bar.update(k)) if bar is not None else None)
    if bar is not None:
        bar.close()
    return [BankSlice(e, lab, nb, c, v, k, z) for e, (_, lab, nb, c, v, k, z) in zip(embeddings, plan)]


def _band_rows(rows: list, label_zyx: np.ndarray, band: int, past_end: int = 1) -> list:
    """The rows of three runs of consecutive slices: `band` slices inward from each end of the
    labelled extent (with `past_end` slices past it, where a walk must stop) and `band` round the
    largest slice (where a user prompts). Chains walk these; the rest of a long lesion adds little."""
    areas = (label_zyx != 0).reshape(label_zyx.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if present.size == 0:
        return rows
    lo, hi, mid = int(present[0]), int(present[-1]), int(np.argmax(areas))
    keep = set(range(lo - past_end, lo + band)) | set(range(hi - band + 1, hi + past_end + 1)) | \
        set(range(mid - band // 2, mid + band - band // 2))
    return [row for row in rows if row[1] in keep]


def bank_links(bank: Sequence[BankSlice]) -> dict[tuple[int, int], int]:
    """(copy, z) -> bank index of every slice that belongs to a copy (chain episodes step through it)."""
    return {(s.copy, s.z): i for i, s in enumerate(bank) if s.copy >= 0}


def bank_samples(bank: Sequence[BankSlice], min_area: int
                 ) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int]]]:
    """(slice index, object) pairs with the object on the slice, their areas in pixels, and pairs
    where the object ends (a neighbour holds it with at least `min_area` pixels, the slice none)."""
    present, areas, ends = [], [], []
    for i, s in enumerate(bank):
        objs = _objects_in(s.label, min_area)
        present += [(i, v) for v in objs]
        areas += list(objs.values())
        for nb in s.neighbours:
            for v in _objects_in(nb, min_area):
                if not (s.label == v).any() and (i, v) not in ends:
                    ends.append((i, v))
    return present, areas, ends


# ---------------------------------------------------------------------------------- prompts
def jitter_box(box: np.ndarray, rng: np.random.Generator, frac: float = 0.1, px: float = 4.0) -> np.ndarray:
    """Each side moved by up to `frac` of the box size plus `px` pixels, as an expert's box varies."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    d = rng.uniform(-1, 1, 4) * np.array([frac * w + px, frac * h + px, frac * w + px, frac * h + px])
    out = np.clip(box + d * np.array([-1, -1, 1, 1]) * np.sign(rng.uniform(-0.2, 1, 4)), 0, LOWRES - 1)
    return np.array([min(out[0], out[2]), min(out[1], out[3]), max(out[0], out[2]), max(out[1], out[3])], np.float32)


def propagation_box(mask: np.ndarray) -> np.ndarray:
    """The box propagation gives the next slice: the mask's box widened by 3 px (256 frame)."""
    b = _box_xyxy(mask)
    return np.clip(b + np.array([-1, -1, 1, 1]) * PROP_BOX_MARGIN, 0, LOWRES - 1).astype(np.float32)


def click_in(mask: np.ndarray, rng: np.random.Generator, deepest: bool) -> np.ndarray:
    """A click (x, y) inside `mask`: its deepest point, or a random point well inside it."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if deepest:
        idx = int(np.argmax(dist))
    else:
        ok = np.flatnonzero(dist.ravel() >= 0.4 * dist.max())
        idx = int(rng.choice(ok))
    y, x = np.unravel_index(idx, mask.shape)
    return np.array([x, y], dtype=np.float32)


def corrective_click(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, int]:
    """The click a simulated expert makes: centre of the largest error region and its label
    (1 = add what was missed, 0 = remove what is wrong); a confirming click when nothing is wrong."""
    from ..engine.propagation import interior_point_yx, largest_error_region

    error = largest_error_region(truth, pred)
    if error is None:
        if truth.any():
            y, x = interior_point_yx(truth)
            return np.array([x, y], np.float32), 1
        y, x = interior_point_yx(~pred)
        return np.array([x, y], np.float32), 0
    region, kind = error
    y, x = interior_point_yx(region)
    return np.array([x, y], np.float32), kind


def dense_from_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A neighbour's mask as logits like the model's own: a random gain, soft edges, a random
    one- or two-pixel grow or shrink. (256, 256) bool -> (256, 256) float32."""
    from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

    k = int(rng.integers(-2, 3))
    m = mask
    if k > 0:
        m = binary_dilation(m, iterations=k)
    elif k < 0 and mask.sum() > 60:
        m = binary_erosion(m, iterations=-k)
    soft = gaussian_filter(m.astype(np.float32), sigma=float(rng.uniform(0.5, 2.0)))
    return ((soft * 2 - 1) * rng.uniform(4.0, 20.0)).astype(np.float32)


# ---------------------------------------------------------------------------------- episodes
@dataclass
class Episode:
    """A batch's starting prompts (model frame) and targets; `clicks` grows by one per round."""

    target: torch.Tensor                  # (B, 1, 256, 256) float {0, 1}
    boxes: torch.Tensor | None            # (B, 4) xyxy
    dense: torch.Tensor | None            # (B, 1, 256, 256) logits
    clicks: list[np.ndarray]              # each (B, 2) xy
    labels: list[np.ndarray]              # each (B,) int
    start: str


def far_prompt(bank, links, i: int, obj: int, reach: int, rng: np.random.Generator) -> np.ndarray | None:
    """The object's mask on a copy-mate 2..reach slices from slice i (None when there is none).
    A walk's carried mask drifts from the truth (near an end it stays the size of a slice several
    slices inward: 4.4x the true area on the last three slices, v2); a neighbour's mask is almost
    the answer (copying it scores 0.945 3D Dice on the validation sarcomas, the model 0.942), so
    prompts from farther slices teach the decoder to follow the image, not the prompt."""
    s = bank[i]
    k = int(rng.integers(2, max(2, reach) + 1))
    for d in rng.permutation([-1, 1]):
        j = links.get((s.copy, s.z + int(d) * k))
        if j is not None:
            m = bank[j].label == obj
            if m.any():
                return m
    return None


def make_episode(bank, pairs, start: str, rng: np.random.Generator, far: tuple | None = None) -> Episode:
    """far: (links, share, reach): that share of mask prompts comes from `far_prompt`."""
    targets, boxes, dense, first_clicks = [], [], [], []
    for i, obj in pairs:
        s = bank[i]
        truth = s.label == obj
        targets.append(truth)
        nb_masks = [nb == obj for nb in s.neighbours]
        nb_masks = [m for m in nb_masks if m.sum() > 0]
        nb = nb_masks[int(rng.integers(len(nb_masks)))] if nb_masks else truth
        if far is not None and "mask" in start and truth.any() and rng.uniform() < far[1]:
            drifted = far_prompt(bank, far[0], i, obj, far[2], rng)
            nb = drifted if drifted is not None else nb
        if start == "box":
            boxes.append(jitter_box(_box_xyxy(truth), rng))
        elif start == "click":
            first_clicks.append(click_in(truth, rng, deepest=bool(rng.uniform() < 0.5)))
        if "mask" in start:
            dense.append(dense_from_mask(nb, rng))
        if start == "box+mask":
            boxes.append(propagation_box(nb))
    tgt = torch.as_tensor(np.stack(targets)[:, None].astype(np.float32))
    ep = Episode(target=tgt, boxes=torch.as_tensor(np.stack(boxes)) if boxes else None,
                 dense=torch.as_tensor(np.stack(dense)[:, None]) if dense else None, clicks=[], labels=[], start=start)
    if first_clicks:
        ep.clicks.append(np.stack(first_clicks))
        ep.labels.append(np.ones(len(pairs), np.int64))
    return ep


def episode_points(ep: Episode):
    """SAM's point tensors for the clicks so far; a point-only prompt gets SAM's padding point."""
    if not ep.clicks:
        return None
    from ..model.sam import SamModel

    coords = torch.as_tensor(np.stack(ep.clicks, axis=1))          # B,N,2
    labels = torch.as_tensor(np.stack(ep.labels, axis=1))          # B,N
    return SamModel.pad_points(coords, labels, has_box=ep.boxes is not None)


def decode(sam, embeddings, points, boxes, dense, multimask: bool, bf16: bool):
    """Prompt encoder + mask decoder on cached embeddings -> (logits (B,M,256,256) fp32, iou (B,M))."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and embeddings.device.type == "cpu"):
        logits, iou = sam.decode(embeddings, points, boxes, dense, multimask)  # the model's own decode path
    return logits.float(), iou.float()


EMPTY_AREA_SCALE = 16.0  # low-res pixels: a leak of this size costs half of the empty-target term


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, M, H, W) bool and (B, 1, H, W) {0,1} -> (B, M) IoU (1 where both are empty)."""
    t = target > 0.5
    inter = (pred & t).flatten(2).sum(-1).float()
    union = (pred | t).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dice_np(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


# ---------------------------------------------------------------------------------- trainer
class InteractiveTrainer:
    """One interactive fine-tuning run; see `train_interactive`."""

    def __init__(self, cfg: InteractiveConfig, log_fn: Callable[[str], None] | None = None) -> None:
        from ..model.device import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.log = log_fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out = Path(cfg.out)
        self.resume_path = self.out.with_name(self.out.name + ".resume.pt")
        self.rng = np.random.default_rng(cfg.seed)

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from monai.losses import DiceLoss

        from ..model.registry import load_model

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        train_cases = load_datalist(cfg.datalist, cfg.data_root, "training")
        val_source = cfg.validation_datalist or cfg.datalist
        val_root = None if cfg.validation_datalist else cfg.data_root
        val_cases = load_datalist(val_source, val_root, "validation", required=False)
        self.loaded = load_model(cfg.base_model, device=self.device)
        self.base_name = self.loaded.spec.base or self.loaded.spec.name
        sam = self.loaded.sam
        if cfg.distill_weight <= 0:
            self.teacher = None
        elif cfg.teacher_model:
            self.teacher = load_model(cfg.teacher_model, device=self.device).sam.eval()
        else:
            self.teacher = copy.deepcopy(sam).eval()
        for p in sam.parameters():
            p.requires_grad_(False)
        params = [p for part in (sam.prompt_encoder, sam.mask_decoder) for p in part.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.params = params
        # Adam moves every weight by about lr a step: the point embeddings (norm ~2 beside a positional
        # encoding of norm ~11) barely move at the decoder's rate, so the prompt encoder gets more.
        self.optimizer = torch.optim.AdamW(
            [{"params": list(sam.mask_decoder.parameters()), "lr_scale": 1.0},
             {"params": list(sam.prompt_encoder.parameters()), "lr_scale": cfg.prompt_encoder_lr_scale}],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.dice_loss = DiceLoss(sigmoid=True, reduction="none")
        t0 = time.perf_counter()
        self.bank = build_bank(train_cases, self.loaded, cfg, np.random.default_rng(cfg.seed), augment=True, say=self.log)
        self.present, areas, self.ends = bank_samples(self.bank, cfg.min_area)
        # Draw objects with probability ~ sqrt(area): uniform draws over (slice, object) pairs are
        # dominated by the many small structures of a whole-body label map (vessels, ribs), and
        # taught a click to answer with a small blob (a spleen click gave 2.5k of 8.2k pixels).
        w = np.asarray(areas, np.float64) ** cfg.area_weight_power
        # Painted lesions are few beside a whole-body label map's structures: give them a set share.
        from .synthetic import LESION_ID

        painted = np.array([v == LESION_ID for _, v in self.present], bool)
        if painted.any() and not painted.all() and cfg.synthetic_share > 0:
            w = np.where(painted, w * cfg.synthetic_share / w[painted].sum(),
                         w * (1 - cfg.synthetic_share) / w[~painted].sum())
        self.present_p = w / w.sum()
        # Chains start on slices whose copy-mates above or below were encoded too.
        self.links = bank_links(self.bank)
        chainable = np.array([any((self.bank[i].copy, self.bank[i].z + d) in self.links for d in (-1, 1))
                              for i, _ in self.present], bool) if self.present else np.zeros(0, bool)
        self.chain_idx = np.flatnonzero(chainable)
        self.chain_p = w[chainable] / w[chainable].sum() if chainable.any() else None
        self.end_starts = self._end_starts(self.bank, self.links, cfg.chain_length)
        self.val_bank = []
        if val_cases:
            vcfg = copy.copy(cfg)
            vcfg.views, vcfg.ct_windows = ("axial",), ("abdomen",)
            full = build_bank(val_cases, self.loaded, vcfg, np.random.default_rng(12345), augment=False, say=self.log)
            self.val_bank = full
        self.val_pairs = self._validation_pairs()
        self.log(f"{len(self.present)} object samples and {len(self.ends)} object-end samples from {len(self.bank)} "
                 f"slices; {len(self.val_pairs)} validation samples ({time.perf_counter() - t0:.0f} s)")

    def _validation_pairs(self) -> list[tuple[int, int]]:
        """Per validation object: its largest slice and slices spread over its extent."""
        by_obj: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for i, s in enumerate(self.val_bank):
            for v in _objects_in(s.label, self.cfg.min_area):
                by_obj.setdefault((s.case, v), []).append((int((s.label == v).sum()), i))
        pairs = []
        for (case, v), items in sorted(by_obj.items()):
            items.sort(reverse=True)
            chosen = [items[0]] + [items[k] for k in np.linspace(0, len(items) - 1, self.cfg.val_slices_per_object + 1)
                                   .round().astype(int)[1:] if k < len(items)]
            seen = set()
            for _, i in chosen:
                if i not in seen:
                    seen.add(i)
                    pairs.append((i, v))
        return pairs

    # -- one episode ---------------------------------------------------------------------------
    def _embeddings(self, bank, pairs) -> torch.Tensor:
        return torch.as_tensor(np.stack([bank[i].embedding for i, _ in pairs]).astype(np.float32)).to(self.device)

    def run_episode(self, bank, pairs, start: str, rounds: int, rng: np.random.Generator, train: bool):
        """Round 0 from the start prompt, then `rounds` corrective rounds. Returns per-round losses
        (tensors with gradients when training) and per-round mean Dice (256 frame)."""
        sam = self.loaded.sam
        cfg = self.cfg
        far = (self.links, cfg.far_prompt_share, cfg.far_prompt_reach) if train and cfg.far_prompt_share > 0 else None
        ep = make_episode(bank, pairs, start, rng, far)
        emb = self._embeddings(bank, pairs)
        target = ep.target.to(self.device)
        truth_np = ep.target[:, 0].numpy() > 0.5
        dense = None if ep.dense is None else ep.dense.to(self.device)
        boxes = None if ep.boxes is None else ep.boxes.to(self.device)
        losses, dices = [], []
        for r in range(rounds + 1):
            # One output for every prompt, a lone click included: LiteMedSAM's three multimask
            # outputs were never trained by MedSAM and their hypernetworks had decayed to a sixth
            # of the single output's weight norm (all three answered ~0 logits to a click).
            multimask = cfg.click_multimask and start == "click" and r == 0
            pts = episode_points(ep)
            if pts is not None:
                pts = (pts[0].to(self.device), pts[1].to(self.device))
            with torch.set_grad_enabled(train):
                logits, iou_pred = decode(sam, emb, pts, boxes, dense, multimask, cfg.bf16)
                b, m = logits.shape[:2]
                seg = self.seg_loss(logits, target)  # B,M
                real_iou = _iou(logits.detach() > 0, target)
                best = seg.detach().argmin(dim=1) if multimask else torch.zeros(b, dtype=torch.long, device=self.device)
                pick = torch.arange(b, device=self.device)
                loss = seg[pick, best].mean() + cfg.iou_weight * F.mse_loss(iou_pred, real_iou)
                if r == 0 and start == "box" and self.teacher is not None and train:
                    with torch.no_grad():
                        t_logits, _ = decode(self.teacher, emb, None, boxes, None, False, cfg.bf16)
                    loss = loss + cfg.distill_weight * F.binary_cross_entropy_with_logits(
                        logits[:, :1], torch.sigmoid(t_logits))
            losses.append(loss)
            chosen = logits[pick, best].detach()  # B,256,256
            if multimask and not train:  # at inference the engine keeps the best predicted IoU
                chosen = logits[pick, iou_pred.detach().argmax(dim=1)].detach()
            pred_np = (chosen > 0).cpu().numpy()
            dices.append(float(np.mean([dice_np(p, t) for p, t in zip(pred_np, truth_np)])))
            if r == rounds:
                break
            clicks = [corrective_click(t, p) for t, p in zip(truth_np, pred_np)]
            ep.clicks.append(np.stack([c for c, _ in clicks]))
            ep.labels.append(np.array([k for _, k in clicks], np.int64))
            dense = chosen[:, None]  # the round's own low-res logits: what the engine feeds back
        return losses, dices

    def _largest_slices(self, bank) -> dict[tuple[int, int], int]:
        """(copy, object) -> z of the bank slice where the object is largest (cached per bank)."""
        cache = self.__dict__.setdefault("_largest_cache", {})
        if id(bank) not in cache:
            best: dict[tuple[int, int], tuple[int, int]] = {}
            for s in bank:
                if s.copy < 0:
                    continue
                ids, counts = np.unique(s.label[s.label != 0], return_counts=True)
                for v, c in zip(ids.tolist(), counts.tolist()):
                    if c > best.get((s.copy, v), (-1, 0))[0]:
                        best[(s.copy, v)] = (c, s.z)
            cache[id(bank)] = {k: z for k, (_, z) in best.items()}
        return cache[id(bank)]

    def _end_starts(self, bank, links, reach: int) -> list[tuple[int, int, int]]:
        """(bank index, object, step towards the end) of every slice that holds an object within
        `reach` slices of where the object ends in its copy, with the walk to the end encoded: the
        tapering last slices, where a walk on its own masks keeps too much (the object's largest
        slice, where most chains start, is far from them)."""
        extent: dict[tuple[int, int], list[int]] = {}
        for i, obj in self.present:
            s = bank[i]
            if s.copy >= 0:
                lo_hi = extent.setdefault((s.copy, obj), [s.z, s.z])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], s.z), max(lo_hi[1], s.z)
        starts = []
        for i, obj in self.present:
            s = bank[i]
            if s.copy < 0:
                continue
            lo, hi = extent[(s.copy, obj)]
            for end, d in ((hi, 1), (lo, -1)):
                if 0 <= (end - s.z) * d < reach and all((s.copy, z) in links for z in range(s.z, end + d, d)):
                    starts.append((i, obj, d))
        return starts

    def run_chain(self, bank, links, pairs, rng: np.random.Generator, train: bool, length: int,
                  towards: list[int] | None = None):
        """A propagation walk on the model's own answers, as the engine walks (`prompt_from_previous`
        in box+mask mode: the previous answer's box widened by 3 px and its low-res logits), from a
        box or one-click seed, `length` slices up or down at most (past the object's end where that
        slice was encoded: the target is empty there), then one corrective click where the
        challenge's rule puts it (deepest voxel of the largest 3D error over the walked slices),
        answered with that slice's own logits. Loss on every slice and on the correction; a slice's
        answer reaches the next one detached, as at inference. Returns (losses, [seed Dice, walk
        Dice, Dice after the click])."""
        from ..evaluation.simulate import largest_error_click

        sam, cfg = self.loaded.sam, self.cfg
        seed = "box" if rng.uniform() < 0.5 else "click"
        b = len(pairs)
        objs = [obj for _, obj in pairs]
        cur = [i for i, _ in pairs]
        # Walks go outward from where the object is largest, as the engine's walks from a seed
        # there do (most of the time: the rest walk inward, as from a seed near an end).
        largest = self._largest_slices(bank)
        step_dir = []
        for k, (i, obj) in enumerate(pairs):
            d = int(rng.choice([-1, 1]))
            mid = largest.get((bank[i].copy, obj))
            if towards is not None:
                d = towards[k]
            elif mid is not None and bank[i].z != mid and rng.uniform() < cfg.outward_share:
                d = 1 if bank[i].z > mid else -1
            if (bank[i].copy, bank[i].z + d) not in links:
                d = -d
            step_dir.append(d)
        ep = make_episode(bank, pairs, seed, rng)
        pts = episode_points(ep)
        if pts is not None:
            pts = (pts[0].to(self.device), pts[1].to(self.device))
        boxes = None if ep.boxes is None else ep.boxes.to(self.device)
        losses, walked = [], [[] for _ in range(b)]  # walked[k]: (bank index, logits (256,256)) per slice

        def step(idx: list[int], members: list[int], boxes_t, dense_t, points):
            emb = self._embeddings(bank, [(i, 0) for i in idx])
            target = torch.as_tensor(np.stack([bank[i].label == objs[k] for i, k in zip(idx, members)])[:, None]
                                     .astype(np.float32)).to(self.device)
            with torch.set_grad_enabled(train):
                logits, iou_pred = decode(sam, emb, points, boxes_t, dense_t, False, cfg.bf16)
                loss = self.seg_loss(logits, target)[:, 0].mean() + cfg.iou_weight * F.mse_loss(
                    iou_pred, _iou(logits.detach() > 0, target))
            losses.append(loss * len(members) / b)
            return logits[:, 0].detach()

        out = step(cur, list(range(b)), boxes, None, pts)
        for k in range(b):
            walked[k].append((cur[k], out[k]))
        prev = out
        members = list(range(b))
        for _ in range(length):
            nxt, keep = [], []
            for row, k in enumerate(members):
                j = links.get((bank[cur[k]].copy, bank[cur[k]].z + step_dir[k]))
                if j is not None and bool((prev[row] > 0).any()):  # the engine stops on an empty answer
                    nxt.append(j)
                    keep.append((row, k))
            if not keep:
                break
            rows = [r for r, _ in keep]
            members = [k for _, k in keep]
            masks = (prev[rows] > 0).cpu().numpy()
            boxes_t = torch.as_tensor(np.stack([propagation_box(m) for m in masks])).to(self.device)
            prev = step(nxt, members, boxes_t, prev[rows][:, None], None)
            for row, k in enumerate(members):
                cur[k] = nxt[row]
                walked[k].append((nxt[row], prev[row]))
        # Dice over the walk, then one click from the 3D error of each walk.
        preds = [np.stack([(lg > 0).cpu().numpy() for _, lg in w]) for w in walked]
        truths = [np.stack([bank[i].label == objs[k] for i, _ in walked[k]]) for k in range(b)]
        dice_walk = float(np.mean([dice_np(p, t) for p, t in zip(preds, truths)]))
        dice_seed = float(np.mean([dice_np(p[0], t[0]) for p, t in zip(preds, truths)]))
        fix_idx, fix_members, fix_logits, fix_clicks, fix_labels = [], [], [], [], []
        for k in range(b):
            click = largest_error_click(preds[k], truths[k])
            if click is None:
                continue
            z, yx, lab = click
            fix_idx.append(walked[k][z][0])
            fix_members.append(k)
            fix_logits.append(walked[k][z][1])
            fix_clicks.append(np.array([[yx[1], yx[0]]], np.float32))
            fix_labels.append(np.array([lab], np.int64))
        dice_fixed = dice_walk
        if fix_idx:
            from ..model.sam import SamModel

            points = SamModel.pad_points(torch.as_tensor(np.stack(fix_clicks)), torch.as_tensor(np.stack(fix_labels)),
                                         has_box=False)
            points = (points[0].to(self.device), points[1].to(self.device))
            fixed = step(fix_idx, fix_members, None, torch.stack(fix_logits)[:, None], points)
            for row, k in enumerate(fix_members):
                z = [i for i, _ in walked[k]].index(fix_idx[row])
                preds[k][z] = (fixed[row] > 0).cpu().numpy()
            dice_fixed = float(np.mean([dice_np(p, t) for p, t in zip(preds, truths)]))
        return losses, [dice_seed, dice_walk, dice_fixed]

    def seg_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI Dice + BCE per mask: (B, M, H, W) logits, (B, 1, H, W) target -> (B, M). An empty
        target (a slice past the object's end) is scored by BCE plus P / (P + s), P the soft
        predicted area in low-res pixels: averaged BCE barely feels a 300-pixel leak, while 3D Dice
        and the walk's stop do (a leak past the end carries the walk on)."""
        tgt = target.expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").mean(dim=(2, 3))
        dice = self.dice_loss(logits, tgt).reshape(bce.shape)
        has_object = (target.flatten(1).sum(1) > 0).float()[:, None]
        area = torch.sigmoid(logits.float()).sum(dim=(2, 3))
        leak = area / (area + EMPTY_AREA_SCALE)
        return bce + dice * has_object + self.cfg.empty_weight * leak * (1 - has_object)

    # -- loops ---------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed * 1_000_003 + step)  # a resumed run draws the same steps
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr(step) * g.get("lr_scale", 1.0)
        self.loaded.sam.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.chain_p is not None and rng.uniform() < cfg.chain_share:
            towards = None
            if self.end_starts and rng.uniform() < cfg.end_chain_share:
                picks = rng.integers(0, len(self.end_starts), cfg.batch_size)
                pairs = [self.end_starts[int(k)][:2] for k in picks]
                towards = [self.end_starts[int(k)][2] for k in picks]
                length = cfg.chain_length
            else:
                picks = rng.choice(len(self.chain_idx), cfg.batch_size, p=self.chain_p)
                pairs = [self.present[int(self.chain_idx[k])] for k in picks]
                length = int(rng.integers(1, cfg.chain_length + 1))
            losses, dices = self.run_chain(self.bank, self.links, pairs, rng, True, length, towards)
            info = {"start": "chain" + (" (end)" if towards else ""), "rounds": length}
        else:
            names = list(cfg.starts)
            weights = np.array([cfg.starts[n] for n in names], np.float64)
            start = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            use_ends = start in END_STARTS and self.ends and rng.uniform() < 0.25
            if use_ends:
                pairs = [self.ends[int(k)] for k in rng.integers(0, len(self.ends), cfg.batch_size)]
            else:
                pairs = [self.present[int(k)] for k in rng.choice(len(self.present), cfg.batch_size, p=self.present_p)]
            rounds = int(rng.integers(0, cfg.max_rounds + 1))
            losses, dices = self.run_episode(self.bank, pairs, start, rounds, rng, train=True)
            info = {"start": start + (" (end)" if use_ends else ""), "rounds": rounds}
        total = torch.stack(losses).mean()
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return {"loss": float(total.detach()), **info, "dice_first": dices[0], "dice_last": dices[-1]}

    @torch.no_grad()
    def validate(self) -> dict:
        """Dice on held-out slices: box, one click, the neighbour's mask, and after 3 corrections
        from a box and from a click. 'score' is their mean."""
        if not self.val_pairs:
            return {}
        self.loaded.sam.eval()
        out: dict[str, float] = {}
        for start, rounds in (("box", 3), ("click", 3), ("mask", 0), ("box+mask", 0)):
            rng = np.random.default_rng(777)
            firsts, lasts = [], []
            for k in range(0, len(self.val_pairs), 16):
                chunk = self.val_pairs[k:k + 16]
                _, dices = self.run_episode(self.val_bank, chunk, start, rounds, rng, train=False)
                firsts.append((dices[0], len(chunk)))
                lasts.append((dices[-1], len(chunk)))
            n = sum(c for _, c in firsts)
            out[start] = sum(d * c for d, c in firsts) / n
            if rounds:
                out[f"{start}+{rounds}clicks"] = sum(d * c for d, c in lasts) / n
        links = bank_links(self.val_bank)
        chain_pairs = [(i, v) for i, v in self.val_pairs
                       if any((self.val_bank[i].copy, self.val_bank[i].z + d) in links for d in (-1, 1))]
        if chain_pairs and self.cfg.chain_share > 0:
            rng = np.random.default_rng(778)
            walks, fixes, n = 0.0, 0.0, 0
            for k in range(0, len(chain_pairs), 16):
                chunk = chain_pairs[k:k + 16]
                _, dices = self.run_chain(self.val_bank, links, chunk, rng, False, self.cfg.chain_length)
                walks, fixes, n = walks + dices[1] * len(chunk), fixes + dices[2] * len(chunk), n + len(chunk)
            out["chain"], out["chain+click"] = walks / n, fixes / n
        out["score"] = float(np.mean(list(out.values())))
        return out

    def save_model(self, path: Path, meta: dict) -> Path:
        from ..model.checkpoints import save_checkpoint

        sam = self.loaded.sam
        if self.cfg.fp16_weights:
            sam = copy.deepcopy(sam).half()
        return save_checkpoint(path, sam, base=self.base_name, meta=meta,
                               trainable_prefixes=("prompt_encoder.", "mask_decoder."))

    def _trainable_state(self) -> dict:
        sam = self.loaded.sam
        return {n: p.detach().cpu().clone() for n, p in sam.named_parameters() if p.requires_grad}

    def save_resume(self, state: dict) -> None:
        from ..io.atomic import atomic_torch_save

        atomic_torch_save(self.resume_path, state)

    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        deadline = None if cfg.max_minutes is None else t_start + 60 * cfg.max_minutes
        torch.manual_seed(cfg.seed)
        self.setup()
        history: list[dict] = []
        first_step, best = 0, -math.inf
        if cfg.resume:
            from .trainer import read_resume_state

            state = read_resume_state(self.resume_path)
            self.loaded.sam.load_state_dict(state["trainable"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            first_step, best, history = int(state["step"]), float(state["best"]), list(state["history"])
            self.log(f"resumed at step {first_step} (best validation score {best:.4f})")
        else:
            val = self.validate()
            history.append({"step": 0, "val": val})
            self.log("step 0 (stock): val " + _fmt(val))
        stopped = "steps done"
        window: list[dict] = []
        step = first_step
        while step < cfg.steps:
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time limit"
                break
            window.append(self.train_step(step))
            step += 1
            if step % 10 == 0:
                self.log(f"step {step}/{cfg.steps}: loss {np.mean([w['loss'] for w in window[-10:]]):.4f} "
                         f"dice first {np.mean([w['dice_first'] for w in window[-10:]]):.3f} "
                         f"last {np.mean([w['dice_last'] for w in window[-10:]]):.3f} "
                         f"({(time.perf_counter() - t_start) / 60:.1f} min)")
            if step % cfg.val_every == 0 or step == cfg.steps:
                best = self._checkpoint(step, history, window, best)
                window = []
        if step % cfg.val_every != 0 and step != cfg.steps and window:
            best = self._checkpoint(step, history, window, best)
        result = {"checkpoint": str(self.out), "history": history, "best_score": best, "stopped": stopped,
                  "steps": step, "seconds": time.perf_counter() - t_start, "rank": 0}
        self.log(f"done ({stopped}) at step {step}; best validation score {best:.4f}; checkpoint {self.out}")
        return result

    def _checkpoint(self, step: int, history: list, window: list, best: float) -> float:
        val = self.validate()
        train = {"loss": float(np.mean([w["loss"] for w in window])) if window else float("nan"),
                 "dice_first": float(np.mean([w["dice_first"] for w in window])) if window else float("nan")}
        history.append({"step": step, "train": train, "val": val})
        score = val.get("score", -train["loss"])
        improved = score > best
        if improved or not self.out.exists():
            best = max(best, score)
            self.save_model(self.out, self._meta(history, step, val))
        if self.cfg.keep_checkpoints:
            self.save_model(self.out.with_name(f"{self.out.stem}_step{step}{self.out.suffix}"),
                            self._meta(history, step, val))
        self.save_resume({"step": step, "trainable": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                          "best": best, "history": history, "config": _plain(self.cfg)})
        self.log(f"step {step}: val " + _fmt(val) + (" | saved" if improved else ""))
        return best

    def _meta(self, history: list, step: int, val: dict) -> dict:
        return {"trained_by": "medsam_plugin.training.interactive", "objective": "interactive", "step": step,
                "validation": val, "history": history, "config": _plain(self.cfg),
                "prompts": ["box", "points", "mask"], "recommended_mode": "box+mask", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                **({"stop_policy": self.cfg.stop_policy} if self.cfg.stop_policy else {})}


def _fmt(val: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in val.items())


def _plain(cfg: InteractiveConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def train_interactive(config: InteractiveConfig | None = None, log_fn=None, **kwargs) -> dict:
    """Run interactive fine-tuning; returns {"checkpoint", "history", "best_score", "stopped", ...}."""
    cfg = config or InteractiveConfig(**kwargs)
    return InteractiveTrainer(cfg, log_fn).run()
