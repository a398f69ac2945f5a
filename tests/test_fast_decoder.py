"""The fast mask decoder: the reference decoder's logits and IoU, its per-slice state kept and renewed.

Run on the real LiteMedSAM weights and the real embedding of the spleen sample's largest slice.
No timings here (benchmarks/run_all.py section 2 measures the re-prompt).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam_plugin.engine.predictor import SlicePredictor
from medsam_plugin.model.fast_decoder import FastMaskDecoder

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def spleen(spleen_slice, lite_medsam):
    """(uint8 view volume, largest slice z, GT box, GT mask, that slice's embedding)."""
    volume, z, box, truth = spleen_slice
    predictor = SlicePredictor(lite_medsam, decoder="reference")
    predictor.set_volume(volume)
    return volume, z, box, truth, predictor.embedding(z)


def _prompts(box_model):
    low_res = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)) * 4
    return {
        "box": dict(points=None, boxes=box_model, masks=None),
        "points": dict(points=(torch.tensor([[[120.0, 110.0], [20.0, 30.0]]]), torch.tensor([[1, 0]])),
                       boxes=None, masks=None),
        "box+mask": dict(points=None, boxes=box_model, masks=low_res),
    }


@pytest.mark.parametrize("kind", ["box", "points", "box+mask"])
@pytest.mark.parametrize("multimask", [False, True])
def test_fast_decoder_matches_the_reference(lite_medsam, spleen, kind, multimask):
    _, _, box, _, embedding = spleen
    sam = lite_medsam.sam
    scale = 256 / 166  # the slice's longest side -> the model's 256; any box inside works
    prompt = _prompts(torch.tensor([[box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale]]))[kind]
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(**prompt)
        ref_logits, ref_iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    fast = FastMaskDecoder(sam)
    # The mask prompt goes through the fast path's own encoding, as the predictor sends it.
    state = fast.slice_state(embedding, None if prompt["masks"] is None else fast.dense_tokens(prompt["masks"]))
    logits, iou = fast.decode(state, sparse, multimask)
    assert logits.shape == ref_logits.shape[1:] == ((3 if multimask else 1), 256, 256)
    assert iou.shape == ref_iou.shape[1:]
    # fp32 rounding only: summation order differs, nothing else.
    assert torch.allclose(logits, ref_logits[0], rtol=1e-4, atol=1e-4 * float(ref_logits.abs().max()))
    assert torch.allclose(iou, ref_iou[0], atol=1e-5)
    flipped = ((logits > 0) != (ref_logits[0] > 0)).sum().item()
    assert flipped <= 2  # a pixel whose logit is within rounding of 0 may go either way


def test_predictor_default_decoder_gives_the_reference_mask(lite_medsam, spleen):
    volume, z, box, truth, _ = spleen
    results = {}
    for name in ("reference", "fast"):
        predictor = SlicePredictor(lite_medsam, decoder=name)
        predictor.set_volume(volume)
        results[name] = predictor.predict(z, box_xyxy=box)
    assert SlicePredictor(lite_medsam).decoder_name == "fast"
    ref, fast = results["reference"], results["fast"]
    assert np.array_equal(ref.mask_yx, fast.mask_yx)
    assert abs(ref.iou - fast.iou) < 1e-5
    dice = 2 * np.logical_and(fast.mask_yx, truth).sum() / (fast.mask_yx.sum() + truth.sum())
    assert dice > 0.9


def test_slice_state_is_kept_for_reprompts_and_renewed_with_the_embedding(lite_medsam, spleen, monkeypatch):
    volume, z, box, _, _ = spleen
    predictor = SlicePredictor(lite_medsam)
    predictor.set_volume(volume)
    calls = []
    original = FastMaskDecoder.slice_state

    def counting(self, embedding, dense_tokens=None):
        calls.append(dense_tokens is None)
        return original(self, embedding, dense_tokens)

    monkeypatch.setattr(FastMaskDecoder, "slice_state", counting)
    first = predictor.predict(z, box_xyxy=box)
    again = predictor.predict(z, box_xyxy=np.asarray(box) + np.array([1, 1, -1, -1]))
    assert calls == [True], "a second prompt on the slice must reuse its state"
    predictor.predict(z, box_xyxy=box, mask_logits_256=first.logits_256)
    assert calls == [True, False], "a mask prompt changes the image side: no reuse"
    predictor.cache.reset()  # the embedding is gone: the state must not outlive it
    renewed = predictor.predict(z, box_xyxy=box)
    assert calls == [True, False, True]
    assert np.array_equal(renewed.mask_yx, first.mask_yx)
    assert predictor.encode_count == 2 and again.mask_yx.any()


def test_the_dense_tokens_of_a_mask_prompt_are_the_prompt_encoders(lite_medsam, spleen):
    """The per-pixel-matmul mask encoding gives the prompt encoder's dense embedding as image tokens,
    for real logits and for the halved ones a correction asks with."""
    volume, z, box, _, _ = spleen
    predictor = SlicePredictor(lite_medsam)
    predictor.set_volume(volume)
    logits = predictor.predict(z, box_xyxy=box).logits_256
    fast = predictor._fast()
    for scale in (1.0, 0.5):
        masks = torch.as_tensor(logits * scale).reshape(1, 1, 256, 256)
        with torch.inference_mode():
            reference = lite_medsam.sam.prompt_encoder(points=None, boxes=None, masks=masks)[1]
            tokens = fast.dense_tokens(masks)
        assert tokens.shape == (64 * 64, reference.shape[1])
        torch.testing.assert_close(tokens, reference[0].flatten(1).t(), rtol=1e-5, atol=1e-5)


def test_decoder_choice_from_the_environment(lite_medsam, monkeypatch):
    monkeypatch.setenv("MEDSAM_DECODER", "reference")
    assert SlicePredictor(lite_medsam).decoder_name == "reference"
    monkeypatch.setenv("MEDSAM_DECODER", "turbo")
    with pytest.raises(ValueError, match="Unknown decoder 'turbo'.*MEDSAM_DECODER"):
        SlicePredictor(lite_medsam)


def test_several_prompts_in_one_call_give_each_its_own_answer(lite_medsam, spleen):
    """A correction's ways of asking (with and without the box, the logits halved, the newest click
    alone) decoded in one call: each answer is the one `predict` gives that prompt alone, although
    the prompts have different lengths (padding tokens are masked out, not attended to)."""
    volume, z, box, truth, _ = spleen
    predictor = SlicePredictor(lite_medsam)
    predictor.set_volume(volume)
    first = predictor.predict(z, box_xyxy=box)
    points = np.array([[60.0, 70.0], [float(np.argwhere(truth)[0][0]) + 3, float(np.argwhere(truth)[0][1])]])
    labels = np.array([0, 1])
    logits = first.logits_256
    asks = [dict(points_yx=points, point_labels=labels, box_xyxy=box, mask_logits_256=logits),
            dict(points_yx=points, point_labels=labels, mask_logits_256=logits),
            dict(points_yx=points, point_labels=labels, box_xyxy=box, mask_logits_256=logits / 2),
            dict(points_yx=points[-1:], point_labels=labels[-1:], box_xyxy=box, mask_logits_256=logits),
            dict(box_xyxy=box)]  # no mask prompt: the slice's kept state
    alone = [predictor.predict(z, **ask) for ask in asks]
    calls = predictor.decoder_calls
    together = predictor.predict_many(z, asks)
    assert predictor.decoder_calls - calls == 1
    for a, b in zip(alone, together):
        scale = float(np.abs(a.logits_256).max())
        assert np.allclose(a.logits_256, b.logits_256, rtol=1e-4, atol=1e-4 * scale)
        assert abs(a.iou - b.iou) < 1e-5
        assert (a.mask_yx != b.mask_yx).sum() <= 2  # a pixel within rounding of 0 may go either way
    assert len({int(p.mask_yx.sum()) for p in together}) > 1  # the ways really differ
