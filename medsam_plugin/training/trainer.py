"""Fine-tuning LiteMedSAM-family models with simulated propagation prompts (MONAI + PyTorch).

`finetune(FinetuneConfig(...))` is the Python API behind ``medsam-plugin finetune``. What trains:

- ``decoder`` (default): prompt encoder + mask decoder (~4 M parameters). The image encoder is
  frozen, so every slice training can visit is encoded once (and kept on disk under
  ``cache_dir``); each step then runs only the prompt encoder and mask decoder.
- ``all``: the whole model; slices are encoded inside every step (GPU territory).
- ``lora``: LoRA adapters on the encoder's attention ``qkv`` plus prompt encoder + mask decoder;
  the adapters are merged into the saved weights.

Each step draws one prompt recipe (see `PROMPT_RECIPES`) for its whole batch: the neighbour's
ground truth or the model's own low-res logits on the neighbour as a dense prompt, alone or with
the propagation box or point, the expert's jittered box, or corrective clicks. Loss: MONAI
``DiceCELoss`` on the 256x256 low-res logits plus the MSE of the IoU head against the real IoU.
Runs data-parallel under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import case_transforms, data_errors, load_datalist, slice_pairs, split_pairs
from .transforms import SimulatePromptsd

log = logging.getLogger(__name__)

from .options import PROMPT_RECIPES, TRAIN_MODES, VALIDATION_RECIPES  # noqa: E402,F401  (re-exported)


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the CLI flags of ``medsam-plugin finetune``)."""

    datalist: str
    out: str
    data_root: str | None = None
    base_model: str = "lite_medsam"
    train: str = "decoder"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    patience: int = 3
    min_delta: float = 1e-3
    objects: list[int] | None = None
    window: str | None = None
    axis: str = "axial"
    min_area: int = 10
    margin: int = 1
    cache_rate: float = 1.0
    cache_dir: str | None = None
    cache_embeddings: bool = True
    samples_per_epoch: int | None = None
    max_minutes: float | None = None
    recipes: dict[str, float] = field(default_factory=lambda: dict(PROMPT_RECIPES))
    iou_weight: float = 1.0
    lora_rank: int = 4
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    fp16_weights: bool = False
    progress: bool = True
    val_every: int = 6
    max_val_pairs: int | None = 64
    val_recipes: tuple[str, ...] = VALIDATION_RECIPES

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {', '.join(TRAIN_MODES)}; got {self.train!r}.")
        unknown = [r for r in [*self.recipes, *self.val_recipes] if r not in PROMPT_RECIPES]
        if unknown:
            raise ValueError(f"Unknown prompt recipe(s) {unknown}; known: {', '.join(PROMPT_RECIPES)}.")
        if self.train != "decoder":
            self.cache_embeddings = False  # a training encoder changes the embeddings every step


# ---------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    initialised = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        initialised = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), initialised)


def _all_mean(values: list[float], info: DistInfo, device) -> list[float]:
    """Per-rank (sum, count) pairs -> global means."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if info.world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------- model
class PromptedSam(nn.Module):
    """The part of the model a step differentiates: (image or embedding, prompts) -> low-res logits.

    forward(embeddings (B,256,64,64) | None, images (B,3,S,S) | None, points, boxes, masks)
    -> (low_res_logits (B,1,256,256), iou_pred (B,1)). Images go through the image encoder, with
    gradients only when it trains.
    """

    def __init__(self, sam: nn.Module, encoder_trains: bool) -> None:
        super().__init__()
        self.sam = sam
        self.encoder_trains = encoder_trains

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder_trains:
            return self.sam.image_encoder(images)
        with torch.no_grad():
            return self.sam.image_encoder(images)

    def forward(self, embeddings=None, images=None, points=None, boxes=None, masks=None):
        if embeddings is None:
            embeddings = self.encode(images)
        return self.sam.decode(embeddings, points=points, boxes=boxes, masks=masks, multimask_output=False)


def _set_trainable(sam: nn.Module, mode: str, lora_rank: int) -> list[str]:
    for p in sam.parameters():
        p.requires_grad_(False)
    wrapped = []
    if mode == "lora":
        from .lora import apply_lora

        wrapped = apply_lora(sam.image_encoder, rank=lora_rank)
        for name, p in sam.image_encoder.named_parameters():
            p.requires_grad_("lora_" in name)
    if mode == "all":
        for p in sam.image_encoder.parameters():
            p.requires_grad_(True)
    for part in (sam.prompt_encoder, sam.mask_decoder):
        for p in part.parameters():
            p.requires_grad_(True)
    return wrapped


def slice_encoder(loaded) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(encode, model_key) of a frozen image encoder: the engine's encode path
    (`engine.predictor.encode_slices`: (B, H, W) uint8 slices -> (B, 256, 64, 64) float32, with the
    fast encoder path `model.fast.make_encoder` picks, as inference does) and the key its embeddings
    are cached under (`engine.predictor.model_key`, which names that path)."""
    import functools

    from ..engine.predictor import encode_slices, model_key

    try:
        from ..model.fast import make_encoder

        fast = make_encoder(loaded)
    except Exception:  # the fast path is optional
        fast = None
    return functools.partial(encode_slices, loaded, encoder=fast), model_key(loaded.spec, fast)


def read_resume_state(path: Path) -> dict:
    """The resume state a run saved beside its checkpoint (`save_resume`), read with
    `weights_only=True`; FileNotFoundError with a sentence for `--resume` when there is none."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume was given but there is no resume state at {path}; "
                                "start without --resume, or point --out at the earlier run's checkpoint.")
    return torch.load(path, map_location="cpu", weights_only=True)


def default_cache_dir() -> Path:
    """`train_embeddings/` in the cache root (`io.cache.cache_root`)."""
    from ..io.cache import TRAIN_EMBEDDINGS, cache_dir

    return cache_dir(TRAIN_EMBEDDINGS)


# ---------------------------------------------------------------------------------- prompts
def dense_from_mask(mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B,1,256,256) {0,1} -> logits-like (B,1,256,256): +scale inside, -scale outside."""
    return (mask * 2 - 1) * scale.view(-1, 1, 1, 1)


def build_prompts(recipe: str, batch: dict, neighbour_logits: torch.Tensor | None = None):
    """The prompt-encoder arguments (points, boxes, masks) of one recipe for a batch (model frame)."""
    points = boxes = masks = None
    b = batch["target"].shape[0]
    if recipe == "box":
        boxes = batch["box_t"]
    elif recipe in ("mask", "box+mask", "mask+click"):
        masks = dense_from_mask(batch["nb_mask"], batch["mask_scale"])
    if recipe in ("pred", "box+pred"):
        masks = neighbour_logits
    if recipe in ("box+mask", "box+pred", "box+points"):
        boxes = batch["box_prop"]
    if recipe == "box+click":
        boxes = batch["box_t"]
    if recipe in ("points", "box+points"):
        coords, labels = batch["point_prop"], torch.ones(b, 1, dtype=torch.long, device=batch["target"].device)
        points = (coords, labels)
    if recipe in ("box+click", "mask+click"):
        points = (batch["click"], batch["click_label"])
    if points is not None:
        from ..model.sam import SamModel

        points = SamModel.pad_points(*points, has_box=boxes is not None)
    return points, boxes, masks


def needs_neighbour(recipe: str) -> bool:
    return "pred" in recipe


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) logits and {0,1} target -> (B,) IoU of logits > 0 (1 when both are empty)."""
    pred = logits.detach() > 0
    tgt = target > 0.5
    inter = (pred & tgt).flatten(1).sum(1).float()
    union = (pred | tgt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """One fine-tuning run; see `finetune`."""

    def __init__(self, config: FinetuneConfig, log_fn: Callable[[str], None] | None = None) -> None:
        from ..model.device import resolve_device

        self.cfg = config
        device = resolve_device(config.device)
        self.info = init_distributed(device.type)
        if device.type == "cuda" and self.info.world > 1:
            device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.log = log_fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out = Path(config.out)
        self.resume_path = self.out.with_name(self.out.name + ".resume.pt")

    # -- data ---------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.info.main:
            self.log(msg)

    def read_datalist(self) -> tuple[list[dict], list[dict]]:
        """The checked training and validation case lists (fails fast, before the model loads)."""
        cfg = self.cfg
        return (load_datalist(cfg.datalist, cfg.data_root, "training", cfg.objects),
                load_datalist(cfg.datalist, cfg.data_root, "validation", cfg.objects, required=False))

    def build_data(self, loaded) -> None:
        from monai.data import CacheDataset, Dataset

        cfg = self.cfg
        train_cases, val_cases = self.read_datalist()
        encode, key = None, ""
        cache_dir = cfg.cache_dir
        if cfg.cache_embeddings:
            encode, key = slice_encoder(loaded)
            if cache_dir is None and self.info.world > 1:
                cache_dir = str(default_cache_dir())
        bar = self._bar(0, "encoding slices", "slice")

        def progress(k, total, case):
            if bar is not None:
                bar.total = max(bar.total or 0, bar.n + total)
                bar.set_postfix_str(case)
                bar.update(k)

        def chain():
            return case_transforms(cfg.axis, cfg.window, cfg.min_area, encode, key, cfg.margin, cache_dir, 1, progress)

        all_cases = train_cases + val_cases
        if encode is not None and self.info.world > 1:
            # each rank encodes its share into the disk cache once; then everyone reads it
            mine = all_cases[self.info.rank::self.info.world]
            with data_errors():
                for item in Dataset(mine, transform=chain()):
                    pass
            self.info.barrier()
        t0 = time.perf_counter()
        with data_errors():
            self.train_ds = CacheDataset(train_cases, transform=chain(), cache_rate=cfg.cache_rate, num_workers=0,
                                         progress=False, copy_cache=False)
            self.val_ds = (CacheDataset(val_cases, transform=chain(), cache_rate=cfg.cache_rate, num_workers=0,
                                        progress=False, copy_cache=False) if val_cases else None)
            train_items = [self.train_ds[i] for i in range(len(self.train_ds))]
        if bar is not None:
            bar.close()
        pairs = slice_pairs(train_items, cfg.margin)
        if self.val_ds is not None:
            with data_errors():
                val_items = [self.val_ds[i] for i in range(len(self.val_ds))]
            self.train_pairs, self.val_pairs = pairs, slice_pairs(val_items, cfg.margin)
        else:
            val_items = None
            self.train_pairs, self.val_pairs = split_pairs(pairs, cfg.val_every)
        if cfg.max_val_pairs and len(self.val_pairs) > cfg.max_val_pairs:  # evenly spread, deterministic
            keep = np.linspace(0, len(self.val_pairs) - 1, cfg.max_val_pairs).round().astype(int)
            self.val_pairs = [self.val_pairs[i] for i in keep]
        if cfg.cache_rate >= 1.0:  # cached: keep the materialised cases, nothing is re-read
            self.train_cases, self.val_cases = train_items, val_items
        else:  # partly cached (debug): cases are fetched through the dataset on every access
            self.train_cases, self.val_cases = self.train_ds, self.val_ds
        if not self.train_pairs:
            raise ValueError("The datalist yields no training slices: every object is smaller than --min-area.")
        n_obj = sum(len(c["slices"]) for c in train_items)
        self._say(f"data: {len(train_items)} training case(s), {n_obj} object(s), {len(self.train_pairs)} training "
                  f"and {len(self.val_pairs)} validation slice pairs; prepared in {time.perf_counter() - t0:.0f} s")
        with_images = not cfg.cache_embeddings
        self.train_tf = SimulatePromptsd(self.train_cases, loaded.spec.image_size, with_images=with_images,
                                         normalization=loaded.spec.normalization)
        self.train_tf.set_random_state(cfg.seed + 1000 * self.info.rank)
        val_source = self.val_cases if self.val_cases is not None else self.train_cases
        self.val_tf = SimulatePromptsd(val_source, loaded.spec.image_size, with_images=with_images,
                                       normalization=loaded.spec.normalization)
        self.val_samples = None  # built once, deterministic

    def _bar(self, total, desc, unit):
        if not (self.cfg.progress and self.info.main):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def _loader(self, pairs, transform, shuffle: bool, epoch: int, limit: int | None = None):
        from monai.data import Dataset, DistributedSampler
        from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

        ds = Dataset([p.as_dict() for p in pairs], transform=transform)
        if self.info.world > 1:
            sampler = DistributedSampler(ds, shuffle=shuffle, even_divisible=shuffle, num_replicas=self.info.world,
                                         rank=self.info.rank, seed=self.cfg.seed)
            sampler.set_epoch(epoch)
        elif shuffle:
            sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        else:
            sampler = SequentialSampler(ds)
        loader = DataLoader(ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=0, drop_last=False)
        return loader

    # -- model ---------------------------------------------------------------------------------
    def build_model(self):
        from ..model.registry import load_model

        cfg = self.cfg
        loaded = load_model(cfg.base_model, device=self.device)
        self.loaded = loaded
        self.base_name = loaded.spec.base or loaded.spec.name
        self.lora_layers = _set_trainable(loaded.sam, cfg.train, cfg.lora_rank)
        loaded.sam.to(self.device)
        self.module = PromptedSam(loaded.sam, encoder_trains=cfg.train != "decoder")
        self.module.train()
        self.module.sam.image_encoder.train(cfg.train != "decoder")
        if self.info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.module, device_ids=ids, find_unused_parameters=True)
        else:
            self.ddp = self.module
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from monai.losses import DiceCELoss

        self.seg_loss = DiceCELoss(sigmoid=True, squared_pred=False, reduction="mean")
        return loaded

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _neighbour_logits(self, batch: dict) -> torch.Tensor:
        """The model's own low-res logits on the neighbour, prompted like a seed slice (its GT box):
        what the engine feeds the next slice in mask modes. No gradient."""
        with torch.no_grad():
            if "embedding_n" in batch:
                logits, _ = self.module(embeddings=batch["embedding_n"], boxes=batch["box_n_seed"])
            else:
                logits, _ = self.module(images=batch["image_n"], boxes=batch["box_n_seed"])
        return logits.detach()

    def forward(self, recipe: str, batch: dict, model=None):
        model = model or self.ddp
        nb = self._neighbour_logits(batch) if needs_neighbour(recipe) else None
        points, boxes, masks = build_prompts(recipe, batch, nb)
        if "embedding_t" in batch:
            return model(embeddings=batch["embedding_t"], points=points, boxes=boxes, masks=masks)
        return model(images=batch["image_t"], points=points, boxes=boxes, masks=masks)

    def loss(self, logits, iou_pred, target):
        seg = self.seg_loss(logits, target)
        iou = F.mse_loss(iou_pred[:, 0], mask_iou(logits, target))
        return seg + self.cfg.iou_weight * iou, seg.detach(), iou.detach()

    # -- checkpoints --------------------------------------------------------------------------
    def _trainable_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def save_model(self, path: Path, meta: dict) -> Path:
        """The deployable checkpoint (model.checkpoints format): prompt encoder + mask decoder, or the
        whole model (LoRA merged) when the encoder trained."""
        from ..model.checkpoints import save_checkpoint

        sam = self.module.sam
        prefixes = ("prompt_encoder.", "mask_decoder.")
        if self.cfg.train != "decoder":
            prefixes = None
            if self.cfg.train == "lora":
                from .lora import merge_lora

                sam = copy.deepcopy(sam)
                merge_lora(sam)
        if self.cfg.fp16_weights:
            sam = copy.deepcopy(sam).half() if sam is self.module.sam else sam.half()
        return save_checkpoint(path, sam, base=self.base_name, meta=meta, trainable_prefixes=prefixes)

    def save_resume(self, state: dict) -> None:
        from ..io.atomic import atomic_torch_save

        atomic_torch_save(self.resume_path, state)

    def load_resume(self) -> dict | None:
        state = read_resume_state(self.resume_path)
        missing = self.module.load_state_dict(state["trainable"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"The resume state {self.resume_path} does not fit this model/--train mode "
                             f"(unexpected {missing.unexpected_keys[:3]}).")
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    # -- loops ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        from monai.metrics import DiceMetric

        self.module.eval()
        results = {}
        total_loss = [0.0, 0.0]
        for recipe in self.cfg.val_recipes:
            metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
            self.val_tf.set_random_state(1234)  # same jitter every epoch
            for batch in self._loader(self.val_pairs, self.val_tf, shuffle=False, epoch=0):
                batch = self._to_device(batch)
                logits, iou_pred = self.forward(recipe, batch, model=self.module)
                loss, _, _ = self.loss(logits, iou_pred, batch["target"])
                total_loss[0] += float(loss.detach()) * len(logits)
                total_loss[1] += len(logits)
                metric(y_pred=(logits > 0).float(), y=batch["target"])
            buf = metric.get_buffer()
            local = [float(buf.sum()), float(buf.numel())] if buf is not None and buf.numel() else [0.0, 0.0]
            s, c = _all_mean(local, self.info, self.device)
            results[recipe] = s / c if c else float("nan")
        s, c = _all_mean(total_loss, self.info, self.device)
        results["loss"] = s / c if c else float("nan")
        results["score"] = float(np.mean([results[r] for r in self.cfg.val_recipes]))
        self.module.train()
        self.module.sam.image_encoder.train(self.cfg.train != "decoder")
        return results

    def train_epoch(self, epoch: int, deadline: float | None) -> dict:
        cfg = self.cfg
        pairs = self.train_pairs
        loader = self._loader(pairs, self.train_tf, shuffle=True, epoch=epoch)
        steps = len(loader)
        if cfg.samples_per_epoch:
            steps = min(steps, max(1, math.ceil(cfg.samples_per_epoch / (cfg.batch_size * self.info.world))))
        names = list(cfg.recipes)
        weights = np.array([cfg.recipes[n] for n in names], dtype=np.float64)
        weights = weights / weights.sum()
        rng = np.random.default_rng(cfg.seed * 100003 + epoch)  # same recipe on every rank
        bar = self._bar(steps, f"epoch {epoch}", "step")
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, seg, iou, count
        start = time.perf_counter()
        n_steps = 0
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            recipe = names[int(rng.choice(len(names), p=weights))]
            batch = self._to_device(batch)
            logits, iou_pred = self.forward(recipe, batch)
            loss, seg, iou = self.loss(logits, iou_pred, batch["target"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], 1.0)
            self.optimizer.step()
            b = len(logits)
            sums[0] += float(loss.detach()) * b
            sums[1] += float(seg) * b
            sums[2] += float(iou) * b
            sums[3] += b
            n_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}", recipe=recipe)
            # under DDP every rank must take the same number of steps: the time limit is then
            # only checked between epochs
            if deadline is not None and self.info.world == 1 and time.perf_counter() > deadline:
                break
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        total = _all_mean(sums + [float(n_steps)], self.info, self.device)
        count = max(total[3], 1.0)
        return {"loss": total[0] / count, "seg_loss": total[1] / count, "iou_loss": total[2] / count,
                "samples": int(total[3]), "seconds": seconds, "samples_per_s": total[3] / max(seconds, 1e-9),
                "ranks": self.info.world, "steps_per_rank": n_steps}

    def run(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        t_start = time.perf_counter()
        deadline = None if cfg.max_minutes is None else t_start + 60.0 * cfg.max_minutes
        self.read_datalist()  # a missing file or undeclared label stops here, before the model loads
        loaded = self.build_model()
        self._say(f"fine-tuning '{self.base_name}' ({cfg.train}: {self.n_trainable / 1e6:.2f} M trainable parameters) "
                  f"on {self.device}, {self.info.world} process(es)")
        self.build_data(loaded)
        history: list[dict] = []
        best, bad_epochs, first_epoch = -math.inf, 0, 1
        if cfg.resume:
            state = self.load_resume()
            history = list(state.get("history", []))
            best = float(state.get("best", -math.inf))
            bad_epochs = int(state.get("bad_epochs", 0))
            first_epoch = int(state["epoch"]) + 1
            self._say(f"resumed after epoch {state['epoch']} (best validation score {best:.4f})")
        else:
            initial = self.validate()
            history.append({"epoch": 0, "val": initial})
            self._say("epoch 0 (before training): val " + _fmt(initial))
        stopped = "epochs done"
        for epoch in range(first_epoch, cfg.epochs + 1):
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time limit"
                break
            train = self.train_epoch(epoch, deadline)
            val = self.validate()
            history.append({"epoch": epoch, "train": train, "val": val})
            improved = val["score"] > best + cfg.min_delta
            if improved:
                best, bad_epochs = val["score"], 0
            else:
                bad_epochs += 1
            self._say(f"epoch {epoch}: loss {train['loss']:.4f} ({train['samples_per_s']:.2f} samples/s) | val "
                      + _fmt(val) + (" | saved" if improved else f" | no gain for {bad_epochs}"))
            if self.info.main:
                meta = self._meta(history, epoch, val)
                if improved:
                    self.save_model(self.out, meta)
                self.save_resume({"epoch": epoch, "trainable": self._trainable_state(),
                                  "optimizer": self.optimizer.state_dict(), "best": best, "bad_epochs": bad_epochs,
                                  "history": history, "config": _plain_config(cfg)})
            self.info.barrier()
            if bad_epochs >= cfg.patience:
                stopped = f"early stop: no validation gain for {cfg.patience} epochs"
                break
        else:
            stopped = "epochs done"
        if self.info.main and not self.out.exists():  # e.g. resumed run that never improved
            self.save_model(self.out, self._meta(history, history[-1]["epoch"], history[-1]["val"]))
        self.info.barrier()
        result = {"checkpoint": str(self.out), "history": history, "best_score": best, "stopped": stopped,
                  "seconds": time.perf_counter() - t_start, "rank": self.info.rank, "world": self.info.world}
        self._say(f"done ({stopped}); best validation score {best:.4f}; checkpoint {self.out}")
        return result

    def _meta(self, history: list, epoch: int, val: dict) -> dict:
        return {"trained_by": "medsam_plugin.training", "epoch": epoch, "train_mode": self.cfg.train,
                "validation": val, "history": history, "config": _plain_config(self.cfg),
                "recommended_mode": "box+mask", "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def close(self) -> None:
        if self.info.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _fmt(val: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in val.items())


def _plain_config(cfg: FinetuneConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items()}


def finetune(config: FinetuneConfig | None = None, log_fn: Callable[[str], None] | None = None, **kwargs: Any) -> dict:
    """Fine-tune a model; returns {"checkpoint", "history", "best_score", "stopped", "seconds", ...}.

    ``finetune(FinetuneConfig(datalist=..., out=...))`` or ``finetune(datalist=..., out=...)``.
    The checkpoint loads with ``load_model(path)`` and ``medsam-plugin segment --model PATH``.
    """
    cfg = config or FinetuneConfig(**kwargs)
    trainer = Trainer(cfg, log_fn)
    try:
        return trainer.run()
    finally:
        trainer.close()
