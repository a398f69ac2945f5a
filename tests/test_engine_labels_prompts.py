"""Multi-object labels (overlap rule, undo), prompt files, preprocessing: no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam_plugin.engine.labels import LabelVolume
from medsam_plugin.engine.preprocessing import (
    SliceGeometry, WINDOW_PRESETS, normalize_volume, parse_window, slices_to_model_input)
from medsam_plugin.engine.prompts import PromptError, load_prompts, parse_prompts
from medsam_plugin.io import SliceView, read_volume


def test_first_claim_wins_and_own_voxels_are_replaced():
    labels = LabelVolume((3, 8, 8))
    a, b = labels.add_object("liver"), labels.add_object("kidney")
    left = np.zeros((8, 8), bool); left[:, :5] = True
    right = np.zeros((8, 8), bool); right[:, 3:] = True
    labels.commit(a.label_id, {1: left})
    labels.commit(b.label_id, {1: right})
    assert (labels.array[1][:, 3:5] == a.label_id).all()  # overlap kept by the first object
    assert (labels.array[1][:, 5:] == b.label_id).all()
    labels.commit(a.label_id, {1: np.zeros((8, 8), bool)})  # re-segmenting a frees its voxels...
    assert (labels.array[1][:, :3] == 0).all() and (labels.array[1][:, 5:] == b.label_id).all()
    labels.commit(b.label_id, {1: right}, overwrite=True)
    assert (labels.array[1][:, 3:] == b.label_id).all()


def test_undo_redo_restores_exact_states():
    labels = LabelVolume((4, 6, 6))
    obj = labels.add_object()
    states = [labels.array.copy()]
    for z in range(3):
        m = np.zeros((6, 6), bool); m[z:z + 2, 1:4] = True
        labels.commit(obj.label_id, {z: m, z + 1: m})
        states.append(labels.array.copy())
    labels.clear_object(obj.label_id)
    assert labels.array.max() == 0
    for expected in reversed(states):  # undo the clear, then each commit
        assert labels.undo() is not None
        assert np.array_equal(labels.array, expected)
    assert labels.undo() is None
    for expected in states[1:]:
        labels.redo()
        assert np.array_equal(labels.array, expected)


def test_set_array_registers_painted_labels_and_dtype_grows_past_254():
    labels = LabelVolume((2, 4, 4))
    painted = np.zeros((2, 4, 4), np.uint16); painted[0, 0, 0] = 300
    labels.set_array(painted, "paint")
    assert 300 in labels.objects and labels.export_array().dtype == np.uint16
    small = LabelVolume((2, 4, 4))
    small.set_array(np.where(painted > 0, 254, 0).astype(np.uint16))
    assert small.export_array().dtype == np.uint8 and small.export_array().max() == 254
    with pytest.raises(ValueError, match="shape"):
        labels.set_array(np.zeros((3, 4, 4)))


def test_window_presets_and_mr_percentiles():
    assert parse_window("abdomen") == WINDOW_PRESETS["abdomen"] == (40.0, 400.0)
    assert parse_window("-600,1500") == (-600.0, 1500.0) and parse_window(None) is None
    with pytest.raises(ValueError, match="Unknown intensity window"):
        parse_window("spleeny")
    ct = np.array([[[-1000, -160, 40, 240, 3000]]], np.float32)
    assert normalize_volume(ct, "CT").tolist() == [[[0, 0, 128, 255, 255]]]
    mr = np.concatenate([np.zeros(100), np.linspace(1, 1000, 1000)]).reshape(1, 10, 110).astype(np.float32)
    out = normalize_volume(mr, "MR")
    assert out[mr == 0].max() == 0 and out.max() == 255 and out[mr > 0].min() == 0


def test_model_input_geometry_longest_side_and_padding():
    slices = np.random.default_rng(0).integers(0, 255, (2, 100, 50), dtype=np.uint8)
    x, geom = slices_to_model_input(slices, 256)
    assert tuple(x.shape) == (2, 3, 256, 256) and geom.new_hw == (256, 128)
    assert float(x[:, :, :, 128:].abs().max()) == 0.0  # right padding
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert SliceGeometry(100, 50, 256).lowres_valid_hw() == (256, 128)
    assert SliceGeometry(100, 50, 1024).lowres_valid_hw() == (256, 128)


@pytest.fixture(scope="module")
def spleen_view(sample_dir):
    return SliceView(read_volume(sample_dir / "ct_spleen_msd_spleen2_crop" / "image.nii.gz"))


def test_shipped_prompts_file_converts_to_a_box_on_one_view_slice(sample_dir, spleen_view):
    objects = parse_prompts(load_prompts(sample_dir / "ct_spleen_prompts.json"), spleen_view)
    (obj,) = objects
    (sp,) = obj.slices.values()
    assert obj.name == "spleen" and sp.box_xyxy is not None
    z, r, c = spleen_view.voxel_to_view(np.array([[26, 29, 15]]))[0]
    assert sp.z == int(round(z)) and min(sp.box_xyxy[[0, 2]]) <= c <= max(sp.box_xyxy[[0, 2]])


def test_world_frame_prompts_match_voxel_prompts(spleen_view):
    voxel = np.array([[26, 29, 15], [157, 146, 15]], float)
    world = (spleen_view.source_affine @ np.c_[voxel, np.ones(2)].T).T[:, :3]
    a = parse_prompts({"frame": "voxel", "objects": [{"boxes": [voxel.tolist()]}]}, spleen_view)[0]
    b = parse_prompts({"frame": "world", "objects": [{"boxes": [world.tolist()]}]}, spleen_view)[0]
    lps = world * [-1, -1, 1]
    c = parse_prompts({"frame": "world_lps", "objects": [{"boxes": [lps.tolist()]}]}, spleen_view)[0]
    for other in (b, c):
        assert other.slices.keys() == a.slices.keys()
        z = next(iter(a.slices))
        assert np.allclose(other.slices[z].box_xyxy, a.slices[z].box_xyxy, atol=1e-4)


@pytest.mark.parametrize("doc, message", [
    ({"objects": []}, "no objects"),
    ({"objects": [{"name": "x"}]}, "neither boxes nor points"),
    ({"objects": [{"points": [[5000, 1, 1]]}]}, "outside the volume"),
    ({"objects": [{"boxes": [[[1, 1, 1], [20, 20, 9]]]}]}, "different axial slices"),
    ({"frame": "pixels", "objects": [{"points": [[1, 1, 1]]}]}, "unknown frame"),
    ({"objects": [{"points": [{"position": [5, 5, 5], "label": 0}]}]}, "only background points"),
    ({"objects": [{"id": 1, "points": [[5, 5, 5]]}, {"id": 1, "points": [[6, 6, 6]]}]}, "used twice"),
])
def test_bad_prompts_are_explained(spleen_view, doc, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts(doc, spleen_view)


def test_unreadable_prompts_file(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(PromptError, match="JSON object"):
        load_prompts(bad)
