"""Synthetic lesions painted into training slices, so that a model trained on organs meets lesions.

The licensed training cases (the MSD spleen and the TotalSegmentator examples) hold organs: large,
convex, sharp-edged. The objects users click on most are lesions: small to mid-sized blobs with
irregular, often fuzzy borders, brighter or darker than their surroundings, and often a ring (an
enhancing rim around a necrotic core). Painting such lesions into real slices (as synthetic-tumour
work on CT does) gives the model those shapes and contrasts with exact labels and no new data
licence. A ring lesion is labelled as a whole, as its rim alone, or as its core alone, so the model
also learns what a background click in a ring's core means.

A lesion is drawn as a 3D blob across the slice and its two neighbours, so the neighbours' labels
(the dense prompts of mask propagation) are its cross-sections there; a neighbour may lie past
its end (an empty cross-section), which trains the walk's end. Only the centre slice's image is
painted: it is the one that is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# target -> share among ring lesions; solid lesions are labelled whole
RING_TARGETS = {"whole": 0.5, "rim": 0.3, "core": 0.2}


@dataclass(frozen=True)
class LesionDraw:
    """The random draw of one lesion, in pixels of the slice it is painted into."""

    centre_yx: tuple[float, float]
    radii_yx: tuple[float, float]
    angle: float             # rotation of the ellipse, radians
    depth: float             # half-extent across slices, in slices (< 1: it ends at the neighbours)
    roughness: float         # amplitude of the smooth border noise (0 = an ellipse)
    ring: bool
    core_fraction: float     # core radius over the lesion's, for a ring
    contrast: float          # lesion (rim) intensity minus the surroundings', in surround stds
    core_contrast: float     # core intensity minus the surroundings', in surround stds
    blur: float              # border softness, pixels
    target: str              # "whole" | "rim" | "core"

    @staticmethod
    def random(shape_hw: tuple[int, int], body: np.ndarray, rng: np.random.Generator) -> "LesionDraw":
        h, w = shape_hw
        ys, xs = np.nonzero(body)
        if ys.size == 0:
            ys, xs = np.array([h // 2]), np.array([w // 2])
        k = int(rng.integers(0, ys.size))
        side = min(h, w)
        r = float(np.exp(rng.uniform(np.log(0.025 * side), np.log(0.14 * side))))
        aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
        ring = bool(rng.uniform() < 0.45)
        bright = rng.uniform() < 0.7  # FLAIR/T2 and contrast-enhanced lesions are mostly bright
        contrast = float(rng.uniform(1.0, 3.5)) * (1 if bright else -1)
        names = list(RING_TARGETS)
        target = str(rng.choice(names, p=list(RING_TARGETS.values()))) if ring else "whole"
        return LesionDraw(
            centre_yx=(float(ys[k]), float(xs[k])), radii_yx=(r * aspect, r / aspect),
            angle=float(rng.uniform(0, np.pi)), depth=float(rng.uniform(0.8, 6.0)),
            roughness=float(rng.uniform(0.0, 0.35)), ring=ring, core_fraction=float(rng.uniform(0.35, 0.7)),
            contrast=contrast, core_contrast=float(rng.uniform(-1.0, 0.5)) * abs(contrast) * (1 if bright else -1),
            blur=float(min(rng.uniform(0.3, 2.5), 0.3 * r * min(aspect, 1 / aspect))), target=target)


def _shape_field(shape_hw, draw: LesionDraw, rng: np.random.Generator) -> np.ndarray:
    """Normalised radius (1 on the lesion's border at its widest slice) with a smooth, random border."""
    from scipy.ndimage import gaussian_filter

    h, w = shape_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - draw.centre_yx[0], xx - draw.centre_yx[1]
    c, s = np.cos(draw.angle), np.sin(draw.angle)
    u, v = (c * dy + s * dx) / draw.radii_yx[0], (-s * dy + c * dx) / draw.radii_yx[1]
    radius = np.sqrt(u * u + v * v)
    if draw.roughness > 0:
        noise = gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma=max(1.0, 0.4 * min(draw.radii_yx)))
        noise /= max(float(noise.std()), 1e-6)
        radius = radius + draw.roughness * noise * np.minimum(radius, 1.5)
    return radius


def lesion_masks(shape_hw, draw: LesionDraw, rng: np.random.Generator):
    """(lesion, core) bool masks on the slices below, at and above the centre (index 0, 1, 2)."""
    radius = _shape_field(shape_hw, draw, rng)
    lesions, cores = [], []
    for dz in (-1, 0, 1):
        scale = float(np.sqrt(max(0.0, 1.0 - (dz / draw.depth) ** 2))) if draw.depth > 0 else float(dz == 0)
        lesion = radius < scale if scale > 0 else np.zeros(shape_hw, bool)
        core = (radius < scale * draw.core_fraction) if (draw.ring and scale > 0) else np.zeros(shape_hw, bool)
        lesions.append(lesion)
        cores.append(core)
    return lesions, cores


def paint(image_u8: np.ndarray, lesion: np.ndarray, core: np.ndarray, draw: LesionDraw,
          rng: np.random.Generator) -> np.ndarray:
    """The slice with the lesion painted in: soft-edged, textured, contrast set by its surroundings."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    img = image_u8.astype(np.float32)
    ring_zone = binary_dilation(lesion, iterations=max(2, int(0.5 * min(draw.radii_yx)))) & ~lesion
    around = img[ring_zone] if ring_zone.any() else img.ravel()
    mean, std = float(around.mean()), max(float(around.std()), 12.0)
    value = np.full(img.shape, mean + draw.contrast * std, np.float32)
    if draw.ring:
        value[core] = mean + draw.core_contrast * std
    texture = gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 1.0)
    value += 0.25 * std * texture / max(float(texture.std()), 1e-6)
    fill = lesion.astype(np.float32)
    if draw.ring:  # the core blends into the rim, not into the surroundings
        value = np.where(core, gaussian_filter(value, 1.0), value)
    alpha = gaussian_filter(fill, draw.blur) if draw.blur > 0 else fill
    out = img * (1 - alpha) + value * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_lesion(image_u8: np.ndarray, labels: tuple[np.ndarray, np.ndarray, np.ndarray], lesion_id: int,
               rng: np.random.Generator, min_area: int = 16):
    """Paint one lesion into `image_u8` (the centre slice) and label it `lesion_id` in the labels of
    the slices below, at and above. Returns (image, (below, centre, above)), or None when the draw
    gave fewer than `min_area` pixels on the centre slice."""
    body = image_u8 > np.percentile(image_u8, 40)
    draw = LesionDraw.random(image_u8.shape, body, rng)
    lesions, cores = lesion_masks(image_u8.shape, draw, rng)
    if int(lesions[1].sum()) < min_area:
        return None
    painted = paint(image_u8, lesions[1], cores[1], draw, rng)
    out = []
    for lab, lesion, core in zip(labels, lesions, cores):
        target = {"whole": lesion, "rim": lesion & ~core, "core": core}[draw.target]
        lab = np.array(lab, copy=True)
        lab[target] = lesion_id
        if draw.target == "core":  # the rim is some other tissue: not the organ it was painted over
            lab[lesion & ~core] = 0
        out.append(lab)
    if int((out[1] == lesion_id).sum()) < min_area:
        return None
    return painted, tuple(out)


LESION_ID = 65000  # label value of a painted lesion (above any real label of the training cases)


def lesion_slices(image: np.ndarray, label: np.ndarray, count: int, rng: np.random.Generator,
                  modality: str = "CT", min_area: int = 16, tries: int = 8) -> list:
    """`count` randomly augmented slices of a (Z, H, W) uint8 volume with a lesion painted in, as
    (image (H', W') uint8, label (256, 256) uint16, (label below, label above) in the 256 frame)."""
    from .augment import LOWRES, SliceAugment, label_to_lowres

    n = image.shape[0]
    out = []
    for _ in range(count):
        for _ in range(tries):
            z = int(rng.integers(0, n))
            aug = SliceAugment.random(rng, modality)
            img = aug.apply_image(image[z])
            labs = tuple(aug.apply_label(label[zz]) if 0 <= zz < n else np.zeros(img.shape, label.dtype)
                         for zz in (z - 1, z, z + 1))
            painted = add_lesion(img, labs, LESION_ID, rng, min_area)
            if painted is None:
                continue
            img, labs = painted
            low = [label_to_lowres(lab, LOWRES) for lab in labs]
            if int((low[1] == LESION_ID).sum()) >= min_area:
                out.append((img, low[1], (low[0], low[2])))
                break
    return out
