"""Interactive fine-tuning (training/interactive.py) on a tiny slice bank, real LiteMedSAM weights.

The prompt pieces (jittered boxes, clicks, corrective clicks, dense prompts from masks, the slice
augmentation) are checked on synthetic arrays; the loop itself on two encoded spleen slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam_plugin.training.augment import SliceAugment, label_to_lowres
from medsam_plugin.training.interactive import (
    InteractiveConfig,
    InteractiveTrainer,
    click_in,
    corrective_click,
    BankSlice,
    bank_links,
    dense_from_mask,
    far_prompt,
    jitter_box,
    make_episode,
    propagation_box,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _disk(shape=(256, 256), centre=(100, 120), r=30) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_corrective_click_goes_to_the_largest_error_with_its_label():
    truth = _disk()
    pred = truth.copy()
    pred[60:100, 80:160] = False  # a missed band: the click must add (label 1) inside it
    (x, y), label = corrective_click(truth, pred)
    assert label == 1 and truth[int(y), int(x)] and not pred[int(y), int(x)]
    pred2 = truth | _disk(centre=(200, 200), r=20)  # a false island: remove it (label 0)
    (x, y), label = corrective_click(truth, pred2)
    assert label == 0 and pred2[int(y), int(x)] and not truth[int(y), int(x)]


def test_clicks_boxes_and_dense_prompts_stay_on_the_object():
    rng = np.random.default_rng(0)
    truth = _disk()
    for deepest in (True, False):
        x, y = click_in(truth, rng, deepest)
        assert truth[int(y), int(x)]
    x, y = click_in(truth, rng, True)
    assert abs(x - 120) <= 1 and abs(y - 100) <= 1  # the deepest point of a disc is its centre
    box = propagation_box(truth)
    assert np.allclose(box, [87, 67, 153, 133])  # the mask's box widened by 3 px
    for _ in range(20):
        j = jitter_box(np.array([90, 70, 150, 130], np.float32), rng)
        assert 0 <= j[0] <= j[2] <= 255 and 0 <= j[1] <= j[3] <= 255
        assert abs(j[0] - 90) <= 0.1 * 61 + 4 + 1e-3
    logits = dense_from_mask(truth, rng)
    inside, outside = logits[truth & ~np.roll(truth, 5, 0)], logits[~truth]
    assert (logits[100, 120] > 2) and (logits[5, 5] < -2)
    assert inside.mean() > 0 > outside.mean()


def test_far_prompts_come_from_a_copy_mate_two_to_reach_slices_away():
    """A tapering object on nine slices of one copy (radius 40 - 4z), one slice of another copy: a
    far prompt is the object's mask 2..3 slices away in the same copy, never the slice's own or its
    neighbour's, and None where no copy-mate holds it; episodes with share 1 use it, share 0 never."""
    empty = np.zeros((256, 256), np.uint16)
    bank = [BankSlice(np.zeros((1,), np.float16), _disk(r=40 - 4 * z).astype(np.uint16), (empty, empty), "c", "axial",
                      copy=0, z=z) for z in range(9)]
    bank.append(BankSlice(np.zeros((1,), np.float16), _disk(r=30).astype(np.uint16), (empty, empty), "d", "axial",
                          copy=1, z=0))
    links = bank_links(bank)
    rng = np.random.default_rng(0)
    for _ in range(40):
        i = int(rng.integers(0, 9))
        m = far_prompt(bank, links, i, 1, 3, rng)
        radius = int(round(np.sqrt(m.sum() / np.pi)))
        assert abs(radius - (40 - 4 * i)) in (8, 12)  # 2 or 3 slices away, up or down
    assert far_prompt(bank, links, 9, 1, 3, rng) is None
    pairs = [(0, 1)] * 8  # the widest slice: far prompts from above it are smaller than the truth
    far = make_episode(bank, pairs, "box+mask", np.random.default_rng(1), (links, 1.0, 3))
    near = make_episode(bank, pairs, "box+mask", np.random.default_rng(1), (links, 0.0, 3))
    truth_width = 2 * 40 + 1
    assert all(float(b[2] - b[0]) < truth_width for b in far.boxes)  # from a smaller, farther slice (+3 px each side)
    assert all(float(b[2] - b[0]) > truth_width - 10 for b in near.boxes)


def test_slice_augment_moves_image_and_label_together():
    image = np.zeros((80, 120), np.uint8)
    label = np.zeros((80, 120), np.uint16)
    image[10:30, 20:50] = 200
    label[10:30, 20:50] = 7
    rng = np.random.default_rng(3)
    for _ in range(12):
        aug = SliceAugment.random(rng)
        img, lab = aug.apply_image(image), aug.apply_label(label)
        assert img.shape == lab.shape and lab.dtype == np.uint16
        assert set(np.unique(lab)) <= {0, 7}  # nearest neighbour: no new label values
        if (lab == 7).sum() > 20:  # the object's pixels stay bright in the image
            assert img[lab == 7].mean() > img[lab == 0].mean() + 50
    low = label_to_lowres(label)
    assert low.shape == (256, 256) and low[:, 171:].max() == 0  # 120 -> 256 wide, 80 -> 171 high padded
    assert abs((low == 7).sum() / (label == 7).sum() - (256 / 120) ** 2) < 0.4


def spleen_datalist(root: Path, k0: int, k1: int, bank: dict | None = None) -> Path:
    """A datalist of the sample spleen CT's slices k0..k1-1 (training only)."""
    import nibabel as nib

    case = "ct_spleen_msd_spleen2_crop"
    image = nib.load(SAMPLE / case / "image.nii.gz")
    label = nib.load(SAMPLE / case / "label.nii.gz")
    (root / case).mkdir()
    nib.save(image.slicer[:, :, k0:k1], root / case / "image.nii.gz")
    lab = label.slicer[:, :, k0:k1]
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj).astype(np.uint8), lab.affine), root / case / "label.nii.gz")
    item = {"image": f"{case}/image.nii.gz", "label": f"{case}/label.nii.gz", "modality": "CT"}
    if bank is not None:
        item["bank"] = bank
    datalist = root / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}, "training": [item]}))
    return datalist


@pytest.fixture(scope="module")
def tiny_datalist(tmp_path_factory):
    return spleen_datalist(tmp_path_factory.mktemp("interactive_tiny"), 13, 17)


@pytest.mark.model
@pytest.mark.slow
def test_training_lowers_the_loss_of_every_round(tiny_datalist, tmp_path, embedding_cache_dir):
    from medsam_plugin.model.checkpoints import read_checkpoint

    cfg = InteractiveConfig(datalist=str(tiny_datalist), out=str(tmp_path / "m.pth"), views=("axial",),
                            ct_windows=("abdomen",), variants=0, slices_per_variant=2, steps=12, batch_size=4,
                            max_rounds=2, lr=3e-4, warmup_steps=1, val_every=100, device="cpu",
                            cache_dir=str(embedding_cache_dir), progress=False, seed=0, stop_policy="lesion-interactive")
    trainer = InteractiveTrainer(cfg, log_fn=lambda msg: None)
    trainer.setup()
    assert len(trainer.bank) == 2 and trainer.present

    def round_losses(start):
        rng = np.random.default_rng(5)
        pairs = [trainer.present[i % len(trainer.present)] for i in range(4)]
        with torch.no_grad():
            losses, _ = trainer.run_episode(trainer.bank, pairs, start, 2, rng, train=False)
        return [float(v) for v in losses]

    before = {s: round_losses(s) for s in ("click", "mask")}
    for step in range(cfg.steps):
        trainer.train_step(step)
    after = {s: round_losses(s) for s in ("click", "mask")}
    for start in before:
        for r, (b, a) in enumerate(zip(before[start], after[start])):
            assert a < b, f"{start} round {r}: loss {b:.4f} -> {a:.4f}"
    trainer.save_model(Path(cfg.out), {"prompts": ["box", "points", "mask"]})
    ckpt = read_checkpoint(cfg.out)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"prompt_encoder", "mask_decoder"}
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values())  # a few MB to ship
    # The stop rule named at training time travels in the checkpoint and is the one it is used with.
    trainer.save_model(Path(cfg.out), trainer._meta([], cfg.steps, {}))
    from medsam_plugin.engine.propagation import LESION_POLICY, policy_for_model
    from medsam_plugin.model.registry import load_model

    assert policy_for_model(load_model(cfg.out).spec) == LESION_POLICY


def test_an_unknown_stop_policy_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown stop policy 'lesions'.*lesion-interactive"):
        InteractiveConfig(datalist=str(tmp_path / "d.json"), out=str(tmp_path / "m.pth"), stop_policy="lesions")


# ---------------------------------------------------------------------------------- one embedding cache
class _FakeEncoderPath:
    """An image-encoder path as `model.fast.make_encoder` returns them (a `key` naming its numerics),
    whose embeddings are all `value`: fp32 and bf16 paths of one model give different embeddings."""

    def __init__(self, name: str, value: float) -> None:
        self.key = f"encoder={name}/v2"
        self.value = value

    def __call__(self, x):
        return torch.full((x.shape[0], 256, 64, 64), self.value)


def _fake_loaded():
    from types import SimpleNamespace

    from medsam_plugin.model.registry import REGISTRY

    return SimpleNamespace(spec=REGISTRY["lite_medsam"], device=torch.device("cpu"), sam=None, meta={})


def _use_encoder_path(monkeypatch, path) -> None:
    from medsam_plugin.model import fast

    monkeypatch.setattr(fast, "make_encoder", lambda loaded, mode="auto", cache_dir=None: path)


def _training_embeddings(kind: str, datalist: Path, cache: Path, out: Path) -> list[np.ndarray]:
    """The embeddings a training run of `kind` computes or reads back from the disk cache `cache`."""
    if kind == "interactive":
        from medsam_plugin.training.data import load_datalist
        from medsam_plugin.training.interactive import build_bank

        cfg = InteractiveConfig(datalist=str(datalist), out=str(out), views=("axial",), ct_windows=("abdomen",),
                                variants=0, slices_per_variant=2, cache_dir=str(cache), progress=False)
        bank = build_bank(load_datalist(datalist, None, "training"), _fake_loaded(), cfg, np.random.default_rng(0),
                          augment=False, say=lambda msg: None)
        return [s.embedding for s in bank]
    from medsam_plugin.training.trainer import FinetuneConfig, Trainer

    trainer = Trainer(FinetuneConfig(datalist=str(datalist), out=str(out), cache_dir=str(cache), device="cpu",
                                     progress=False, min_area=1), log_fn=lambda msg: None)
    trainer.build_data(_fake_loaded())
    return [e for case in trainer.train_cases for e in case["embeddings"].values()]


@pytest.mark.parametrize("kind", ["interactive", "propagation"])
def test_training_embedding_cache_keeps_encoder_paths_apart(kind, tiny_datalist, tmp_path, monkeypatch):
    """fp32 and bf16 embeddings of one slice never share a cache entry: the training cache key names
    the encoder path (it used to be the model's alone, so a bf16 run read fp32 embeddings back)."""
    cache = tmp_path / "cache"
    got = {}
    for name, value in (("fp32-fast", 1.0), ("bf16", 2.0)):
        _use_encoder_path(monkeypatch, _FakeEncoderPath(name, value))
        got[name] = _training_embeddings(kind, tiny_datalist, cache, tmp_path / "m.pth")
        assert got[name]
    assert all(np.all(e == 1.0) for e in got["fp32-fast"])
    assert all(np.all(e == 2.0) for e in got["bf16"])  # encoded again, not the fp32 entries read back
    again = _training_embeddings(kind, tiny_datalist, cache, tmp_path / "m.pth")  # bf16 still in force
    assert all(np.all(e == 2.0) for e in again)
    assert {p.suffix for p in cache.iterdir()} == {".emb"}  # the engine's self-checking entries


def test_one_model_key_for_inference_and_training(monkeypatch):
    from medsam_plugin.engine.predictor import SlicePredictor, model_key
    from medsam_plugin.training.trainer import slice_encoder

    loaded = _fake_loaded()
    fp32, bf16 = _FakeEncoderPath("fp32-fast", 1.0), _FakeEncoderPath("bf16", 1.0)
    keys = {model_key(loaded.spec), model_key(loaded.spec, fp32), model_key(loaded.spec, bf16)}
    assert len(keys) == 3
    assert SlicePredictor(loaded, encoder=bf16).model_key == model_key(loaded.spec, bf16)
    _use_encoder_path(monkeypatch, bf16)
    encode, key = slice_encoder(loaded)
    assert key == model_key(loaded.spec, bf16)
    assert encode(np.zeros((2, 40, 30), np.uint8)).shape == (2, 256, 64, 64)


def test_synthetic_lesions_are_painted_and_labelled_across_three_slices():
    """A painted lesion changes the centre slice's pixels where it is labelled, is labelled on the
    slice (and as cross-sections, never larger, on its neighbours), and a ring's rim or core target
    leaves the rest of the ring unlabelled."""
    from medsam_plugin.training.synthetic import LESION_ID, add_lesion, lesion_slices

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    body = (((yy - 48) ** 2 + (xx - 48) ** 2) < 40 ** 2)
    image = np.where(body, 100, 0).astype(np.uint8)
    labels = tuple(np.where(body, 3, 0).astype(np.uint16) for _ in range(3))
    targets, n = set(), 0
    for _ in range(60):
        out = add_lesion(image, labels, LESION_ID, rng, min_area=16)
        if out is None:
            continue
        n += 1
        painted, (below, centre, above) = out
        lesion = centre == LESION_ID
        assert lesion.sum() >= 16
        from scipy.ndimage import binary_dilation

        near = binary_dilation(lesion, iterations=3)  # a core target is seen against its rim
        assert np.abs(painted.astype(int) - image.astype(int))[near].max() > 5
        assert (below == LESION_ID).sum() <= lesion.sum() and (above == LESION_ID).sum() <= lesion.sum()
        assert ((centre == 3) | (centre == 0) | lesion).all()
        targets.add(bool(((centre == 0) & body).any()))  # rim/core targets unlabel part of the organ
    assert n >= 40 and targets == {False, True}
    volume = np.stack([image] * 5)
    rows = lesion_slices(volume, np.stack([labels[0]] * 5), 6, rng, "CT", min_area=16)
    assert len(rows) == 6
    for img, lab, (lo, hi) in rows:
        assert img.dtype == np.uint8 and lab.shape == (256, 256) and lo.shape == hi.shape == (256, 256)
        assert (lab == LESION_ID).sum() >= 16


def test_the_slice_bank_takes_painted_lesions_when_asked(tiny_datalist, tmp_path, monkeypatch):
    """--synthetic-slices adds that many painted slices per (case, view, window), each holding a
    lesion object; without it the bank is what it was."""
    from medsam_plugin.training.data import load_datalist
    from medsam_plugin.training.interactive import bank_samples, build_bank
    from medsam_plugin.training.synthetic import LESION_ID

    _use_encoder_path(monkeypatch, _FakeEncoderPath("fp32-fast", 1.0))
    cases = load_datalist(tiny_datalist, None, "training")
    banks = {}
    for count in (0, 3):
        cfg = InteractiveConfig(datalist=str(tiny_datalist), out=str(tmp_path / "m.pth"), views=("axial",),
                                ct_windows=("abdomen",), variants=0, slices_per_variant=2, synthetic_slices=count,
                                cache_dir=str(tmp_path / "cache"), progress=False)
        banks[count] = build_bank(cases, _fake_loaded(), cfg, np.random.default_rng(0), augment=True,
                                  say=lambda msg: None)
    assert len(banks[3]) == len(banks[0]) + 3
    painted = [s for s in banks[3] if s.case.endswith("(synthetic lesion)")]
    assert len(painted) == 3 and all((s.label == LESION_ID).sum() >= 16 for s in painted)
    present, _, _ = bank_samples(banks[3], 16)
    assert sum(v == LESION_ID for _, v in present) == 3
    assert not any(v == LESION_ID for _, v in bank_samples(banks[0], 16)[0])


# ---------------------------------------------------------------------------------- chain episodes
@pytest.fixture(scope="module")
def chain_datalist(tmp_path_factory):
    """Five consecutive spleen slices (the spleen starts on the third), the bank keeping them all so
    chain episodes can walk them."""
    return spleen_datalist(tmp_path_factory.mktemp("interactive_chain"), 1, 6,
                           bank={"all_slices": True, "variants": 0, "ct_windows": ["abdomen"], "views": ["axial"]})


@pytest.mark.model
@pytest.mark.slow
def test_chain_episodes_walk_consecutive_slices_on_the_models_own_answers(chain_datalist, tmp_path,
                                                                          embedding_cache_dir, monkeypatch):
    cfg = InteractiveConfig(datalist=str(chain_datalist), out=str(tmp_path / "m.pth"), variants=3,
                            steps=4, batch_size=3, max_rounds=1, lr=3e-4, warmup_steps=1, val_every=100,
                            device="cpu", cache_dir=str(embedding_cache_dir), progress=False, seed=0,
                            chain_share=1.0, chain_length=3)
    trainer = InteractiveTrainer(cfg, log_fn=lambda msg: None)
    trainer.setup()
    # Per-case bank settings win: one copy (no variants), axial only, every slice holding or ending the spleen.
    assert {s.view for s in trainer.bank} == {"axial"} and len({s.copy for s in trainer.bank}) == 1
    zs = sorted(s.z for s in trainer.bank)
    assert zs == list(range(zs[0], zs[-1] + 1))
    first = next(s for s in trainer.bank if s.z == zs[0])
    assert not (first.label == 1).any() and (first.neighbours[1] == 1).any()  # the slice past the end is there
    assert len(trainer.chain_idx) > 0
    rng = np.random.default_rng(1)
    pairs = [trainer.present[int(trainer.chain_idx[k])] for k in range(3)]
    with torch.no_grad():
        losses, dices = trainer.run_chain(trainer.bank, trainer.links, pairs, rng, False, 3)
    assert 2 <= len(losses) <= 5  # the seed, up to 3 walked slices, a correction
    assert all(torch.isfinite(v) for v in losses) and all(0.0 <= d <= 1.0 for d in dices)
    before = trainer._trainable_state()
    info = trainer.train_step(0)
    assert info["start"] == "chain"
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the walk's losses reach the weights

    # End chains start within chain_length slices of where the spleen ends and walk towards that end.
    present_z = sorted({trainer.bank[i].z for i, _ in trainer.present})
    assert trainer.end_starts
    for i, obj, d in trainer.end_starts:
        end = present_z[-1] if d == 1 else present_z[0]
        assert 0 <= (end - trainer.bank[i].z) * d < cfg.chain_length
    trainer.cfg.end_chain_share = 1.0
    assert trainer.train_step(1)["start"] == "chain (end)"

    # Far prompts: a mask-prompted step whose every prompt comes from 2..3 slices away trains too.
    trainer.cfg.chain_share, trainer.cfg.far_prompt_share, trainer.cfg.far_prompt_reach = 0.0, 1.0, 3
    trainer.cfg.starts = {"box+mask": 1.0}
    import medsam_plugin.training.interactive as interactive

    asked = []
    real_far_prompt = interactive.far_prompt

    def spy(bank, links, i, obj, reach, rng):
        asked.append((links is trainer.links, reach))
        return real_far_prompt(bank, links, i, obj, reach, rng)

    monkeypatch.setattr(interactive, "far_prompt", spy)
    before = trainer._trainable_state()
    info = trainer.train_step(2)
    assert info["start"].startswith("box+mask") and np.isfinite(info["loss"])
    assert asked and all(asked_links and reach == 3 for asked_links, reach in asked)
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
