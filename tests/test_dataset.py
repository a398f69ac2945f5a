"""The dataset worklist (medsam_plugin.dataset): status, saving into a Decathlon layout, two writers,
prompts replay, batch segmentation and fine-tuning on the done cases. Synthetic dataset folders are
built at test time from copies of the sample data (tests/dataset_helpers.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dataset_helpers import SAMPLE, crop_case, truth_view
from fakes import FakePredictor

from medsam_plugin.dataset import Dataset, DatasetError
from medsam_plugin.dataset.replay import prompts_document, session_edits_ijk

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_session(image: Path, truth_label: Path | None = None):
    """A session on `image` whose predictor answers with the ground truth (tests/fakes.py)."""
    from medsam_plugin.engine.propagation import StopRules
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_volume

    session = SegmentationSession(read_volume(image), model="lite_medsam")
    truth = truth_view(session, truth_label) if truth_label else np.zeros(session.shape_zyx, bool)
    session._predictor = FakePredictor(truth)
    session.stop_rules = StopRules(min_iou_with_previous=None)
    return session, truth


def _annotate(session, truth, name="spleen", paint=True):
    """Box on the largest slice, propagate, and a brush stroke: the work a user saves."""
    from medsam_plugin.engine.propagation import bounding_box_xyxy, run_to_completion

    obj = session.add_object(name)
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    box = np.asarray(bounding_box_xyxy(truth[z]), dtype=np.float64)
    session.segment_slice(obj.label_id, z, box_xyxy=box)
    corners = np.array([[z, box[1], box[0]], [z, box[1], box[2]], [z, box[3], box[2]], [z, box[3], box[0]]])
    session.store_prompts(obj.label_id, fg=[[z, (box[1] + box[3]) / 2, (box[0] + box[2]) / 2]], boxes=[corners])
    run_to_completion(session.propagate(obj.label_id))
    if paint:
        arr = session.labels.array.copy()
        arr[z, 2:6, 2:9] = obj.label_id  # a stroke far from the spleen
        arr[z][truth[z] & (np.arange(truth.shape[2])[None, :] % 7 == 0)] = 0  # and some erasing
        session.paint(arr)
    return obj.label_id, z


def _save(ds: Dataset, name: str, session, status="done"):
    return ds.save_case(name, session.labels_ijk(), session.volume, session.labels.names(),
                        {k: o.color for k, o in session.labels.objects.items()},
                        prompts=prompts_document(session, "lite_medsam"), edits=session_edits_ijk(session),
                        session_state=session.to_state(), status=status)


@pytest.fixture
def plain_folder(tmp_path):
    """A plain folder of three scans: two NIfTI crops and one MetaImage (.mha)."""
    import SimpleITK as sitk

    folder = tmp_path / "scans"
    crop_case(folder / "case_a.nii.gz", 8, 22)
    crop_case(folder / "case_b.nii.gz", 6, 20, shift=4)
    sitk.WriteImage(sitk.ReadImage(str(crop_case(tmp_path / "tmp_c.nii.gz", 10, 24))), str(folder / "case_c.mha"))
    (folder / "notes.txt").write_text("not a scan")
    return folder


def test_plain_folder_lists_cases_and_status_round_trips(plain_folder):
    ds = Dataset(plain_folder)
    assert [c.name for c in ds.cases] == ["case_a", "case_b", "case_c"]
    assert all(c.status == "todo" for c in ds.cases)
    ds.set_status("case_b", "skipped")
    ds.set_status("case_a", "in_progress")
    again = Dataset(plain_folder)  # what another process, or the next napari, sees
    assert {c.name: c.status for c in again.cases} == {"case_a": "in_progress", "case_b": "skipped", "case_c": "todo"}
    assert again.progress_text() == "0 of 3 done (1 in progress, 1 skipped)"
    assert again.neighbour("case_a", todo_only=True).name == "case_c"  # skipped cases are passed over
    assert again.neighbour("case_c", 1) is None and again.neighbour("case_c", -1).name == "case_b"
    with pytest.raises(DatasetError, match="Unknown status"):
        again.set_status("case_a", "finished")


def test_empty_or_missing_folder_is_refused_with_a_sentence(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No scans found"):
        Dataset(tmp_path / "empty")


def test_saving_a_case_writes_labels_prompts_and_datalist_for_monai(plain_folder):
    from monai.data import load_decathlon_datalist

    from medsam_plugin.engine.prompts import load_prompts, parse_prompts
    from medsam_plugin.io import read_labels, read_volume
    from medsam_plugin.training.data import load_datalist

    image = plain_folder / "case_a.nii.gz"
    before = _sha(image)
    session, truth = _fake_session(image, None)
    session._predictor = FakePredictor(truth_view(session, _label_for(plain_folder.parent, 8, 22)))
    truth = session._predictor.truth
    _annotate(session, truth)
    ds = Dataset(plain_folder)
    written = _save(ds, "case_a", session)
    case = ds.case("case_a")
    assert case.label == plain_folder / "labelsTr" / "case_a.nii.gz" and case.label in written
    assert _sha(image) == before  # the image is only read
    volume = read_volume(image)
    saved = read_labels(case.label, volume)
    assert np.array_equal(saved, session.labels_ijk())
    import nibabel as nib

    assert np.allclose(nib.load(str(case.label)).affine, nib.load(str(image)).affine)
    # dataset.json: what MONAI's loader and the fine-tune read
    items = load_decathlon_datalist(str(ds.datalist_path), True, "training", base_dir=str(plain_folder))
    assert [Path(i["image"]).resolve() for i in items] == [image.resolve()]
    assert Path(items[0]["label"]).resolve() == case.label
    raw = json.loads(ds.datalist_path.read_text())
    assert raw["labels"] == {"0": "background", "1": "spleen"} and raw["numTraining"] == 1
    assert load_datalist(ds.datalist_path)[0]["objects"] == [1]
    # the prompts file is the CLI's, and names the edits sidecar
    doc = load_prompts(case.prompts_path)
    assert doc["edits"] == case.edits_path.name and case.edits_path.is_file()
    objects = parse_prompts(doc, session.view)
    assert objects[0].name == "spleen" and objects[0].direction == "both"
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    assert list(objects[0].slices) == [z] and objects[0].slices[z].box_xyxy is not None
    # status, volumes and the shared colour are in the state file
    again = Dataset(plain_folder)
    assert again.case("case_a").status == "done" and again.case("case_a").objects[1] > 0
    assert again.label_colors()[1] == tuple(int(c) for c in session.labels.objects[1].color[:3])
    assert again.progress_text().startswith("1 of 3 done")


def _label_for(tmp: Path, z0, z1) -> Path:
    out = tmp / f"truth_{z0}_{z1}.nii.gz"
    if not out.exists():
        crop_case(tmp / f"img_{z0}_{z1}.nii.gz", z0, z1, label_out=out)
    return out


def test_a_label_name_that_contradicts_the_dataset_is_refused(plain_folder):
    ds = Dataset(plain_folder)
    session, _ = _fake_session(plain_folder / "case_a.nii.gz", _label_for(plain_folder.parent, 8, 22))
    _annotate(session, session._predictor.truth, paint=False)
    _save(ds, "case_a", session)
    other, _ = _fake_session(plain_folder / "case_c.mha", _label_for(plain_folder.parent, 10, 24))
    _annotate(other, other._predictor.truth, name="liver", paint=False)
    with pytest.raises(DatasetError, match="Label 1 is 'spleen' in this dataset but 'liver'"):
        _save(ds, "case_c", other)
    assert not ds.case("case_c").label.exists()  # nothing written
    assert [Path(t["image"]).name for t in json.loads(ds.datalist_path.read_text())["training"]] == ["case_a.nii.gz"]


WRITER = r"""
import sys, numpy as np
from medsam_plugin.dataset import Dataset
from medsam_plugin.io import read_volume
root, names = sys.argv[1], sys.argv[2].split(",")
for name in names:
    ds = Dataset(root)
    case = ds.case(name)
    vol = read_volume(case.image)
    lab = np.zeros(vol.data_ijk.shape, np.uint8)
    lab[2:6, 2:6, 1:3] = 1
    ds.save_case(name, lab, vol, {1: "spleen"}, prompts={"frame": "voxel", "objects": []})
print("ok")
"""


def test_two_processes_saving_cases_at_once_lose_no_entry(tmp_path):
    folder = tmp_path / "many"
    for i in range(10):
        crop_case(folder / f"c{i:02d}.nii.gz", 10, 13)
    names = [f"c{i:02d}" for i in range(10)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), ",".join(part)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in (names[0::2], names[1::2])]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
    raw = json.loads((folder / "dataset.json").read_text())
    assert sorted(Path(t["image"]).name for t in raw["training"]) == [f"{n}.nii.gz" for n in names]
    assert raw["numTraining"] == 10
    ds = Dataset(folder)
    assert all(c.status == "done" for c in ds.cases) and ds.progress_text() == "10 of 10 done"
    assert not list(folder.glob(".*.part*")) and not list((folder / "labelsTr").glob(".*"))  # no temporaries left


def test_decathlon_folder_keeps_its_layout_and_reads_both_label_orders(tmp_path):
    root = tmp_path / "Task99"
    crop_case(root / "imagesTr" / "spl_1_0000.nii.gz", 8, 22, label_out=root / "labelsTr" / "spl_1.nii.gz")
    crop_case(root / "imagesTr" / "spl_2_0000.nii.gz", 6, 20)
    crop_case(root / "imagesTs" / "spl_9_0000.nii.gz", 6, 20)
    (root / "dataset.json").write_text(json.dumps({  # nnU-Net v2 order: name -> value
        "labels": {"background": 0, "spleen": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
        "training": [{"image": "./imagesTr/spl_1_0000.nii.gz", "label": "./labelsTr/spl_1.nii.gz"}]}))
    ds = Dataset(root)
    assert [(c.name, c.split, c.status) for c in ds.cases] == [
        ("spl_1", "training", "done"), ("spl_2", "training", "todo"), ("spl_9", "test", "todo")]
    assert ds.label_names() == {1: "spleen"}
    assert ds.case("spl_2").label == root / "labelsTr" / "spl_2.nii.gz"
    session, _ = _fake_session(ds.case("spl_2").image, _label_for(tmp_path, 6, 20))
    _annotate(session, session._predictor.truth, paint=False)
    _save(ds, "spl_2", session)
    raw = json.loads((root / "dataset.json").read_text())
    assert [t["label"] for t in raw["training"]] == ["./labelsTr/spl_1.nii.gz", "./labelsTr/spl_2.nii.gz"]
    assert raw["channel_names"] == {"0": "CT"}  # what it had is kept
    with pytest.raises(DatasetError, match="test case"):
        _save(ds, "spl_9", session)


def test_replaying_the_saved_prompts_rebuilds_the_label_map_voxel_for_voxel_fake_model(plain_folder):
    """The replay path of `segment --prompts` and `segment --datalist` (dataset.batch.replay) on the
    fake predictor: box, a click, propagation and brush edits give back the saved map exactly."""
    from medsam_plugin.dataset.batch import replay
    from medsam_plugin.engine.prompts import load_prompts
    from medsam_plugin.io import read_labels, read_volume

    truth_path = _label_for(plain_folder.parent, 8, 22)
    session, truth = _fake_session(plain_folder / "case_a.nii.gz", truth_path)
    _annotate(session, truth)
    assert session.edits  # the brush stroke is part of what must come back
    ds = Dataset(plain_folder)
    _save(ds, "case_a", session)
    case = ds.case("case_a")
    fresh, _ = _fake_session(case.image, truth_path)
    replay(fresh, load_prompts(case.prompts_path), case.prompts_path)
    saved = read_labels(case.label, read_volume(case.image))
    assert saved.any() and np.array_equal(fresh.labels_ijk(), saved)
    without_edits, _ = _fake_session(case.image, truth_path)
    doc = load_prompts(case.prompts_path)
    doc.pop("edits")
    replay(without_edits, doc, case.prompts_path)
    assert not np.array_equal(without_edits.labels_ijk(), saved)  # the edits sidecar is what made the difference


@pytest.mark.model
@pytest.mark.slow
def test_segment_prompts_replays_a_saved_case_voxel_for_voxel_real_weights(tmp_path, lite_medsam):
    """Real LiteMedSAM: a case annotated in a session (box, propagation, brush) and saved to the dataset
    is rebuilt exactly by `medsam-plugin segment --prompts labelsTr/<case>.prompts.json`."""
    from medsam_plugin.cli import main
    from medsam_plugin.engine.propagation import bounding_box_xyxy, run_to_completion
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_labels, read_volume

    folder = tmp_path / "scans"
    image = crop_case(folder / "spleen.nii.gz", 6, 24)
    session = SegmentationSession(read_volume(image), model="lite_medsam", loaded_model=lite_medsam)
    truth = session.view.to_view(read_labels(_label_for(tmp_path, 6, 24), session.volume)) == 1
    obj = session.add_object("spleen")
    z = int(np.argmax(truth.sum(axis=(1, 2))))
    x0, y0, x1, y1 = (float(v) for v in bounding_box_xyxy(truth[z]))
    session.segment_slice(obj.label_id, z, box_xyxy=np.array([x0, y0, x1, y1], np.float32))
    session.store_prompts(obj.label_id, boxes=[[[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]]])
    run_to_completion(session.propagate(obj.label_id))
    arr = session.labels.array.copy()
    arr[z, 3:9, 3:12] = obj.label_id
    session.paint(arr)
    ds = Dataset(folder)
    _save(ds, "spleen", session)
    out = tmp_path / "replayed.nii.gz"
    assert main(["segment", str(image), "--prompts", str(ds.case("spleen").prompts_path), "--out", str(out),
                 "--model", "lite_medsam", "--device", "cpu"]) == 0
    volume = read_volume(image)
    saved = read_labels(ds.case("spleen").label, volume)
    replayed = read_labels(out, volume)
    assert (saved == 1).sum() > 1000
    assert np.array_equal(replayed, saved)


@pytest.mark.model
@pytest.mark.slow
def test_batch_segment_on_three_cases_with_one_broken(tmp_path, capsys, monkeypatch):
    """`segment --datalist`: two cases are written, the broken one is named, the exit status says so,
    and nothing of the broken case is left half-written."""
    from medsam_plugin.cli import main

    monkeypatch.setenv("MEDSAM_PLUGIN_CACHE", str(tmp_path / "cache"))  # its embeddings go to the widget's cache

    folder = tmp_path / "cohort"
    for name, (z0, z1) in {"a": (10, 16), "b": (11, 17), "c": (12, 18)}.items():
        crop_case(folder / f"{name}.nii.gz", z0, z1)
    ds = Dataset(folder)
    for c in ds.cases:
        from medsam_plugin.io import read_volume

        vol = read_volume(c.image)
        lab = np.zeros(vol.data_ijk.shape, np.uint8)
        lab[60:100, 60:100, 2] = 1
        doc = {"frame": "voxel", "axis": "axial", "objects": [
            {"id": 1, "name": "spleen", "boxes": [[[40, 40, 2], [120, 120, 2]]], "direction": "both"}]}
        ds.save_case(c.name, lab, vol, {1: "spleen"}, prompts=doc)
    (folder / "b.nii.gz").write_bytes(b"\x1f\x8b broken")  # the scan of case b is damaged since
    out_dir = tmp_path / "out"
    rc = main(["segment", "--datalist", str(folder / "dataset.json"), "--out-dir", str(out_dir),
               "--model", "lite_medsam", "--device", "cpu", "--json", str(tmp_path / "batch.json")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "b:" in captured.err and "a:" not in captured.err and "c:" not in captured.err
    assert "2 of 3 cases segmented; failed: b" in captured.out
    assert sorted(p.name for p in out_dir.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporaries
    report = json.loads((tmp_path / "batch.json").read_text())
    assert [(r["name"], r["ok"]) for r in report["cases"]] == [("a", True), ("b", False), ("c", True)]
    import nibabel as nib

    assert (np.asarray(nib.load(str(out_dir / "a.nii.gz")).dataobj) == 1).sum() > 500
    assert list((tmp_path / "cache" / "embeddings").glob("*.emb"))  # shared with the napari widget's cache


def test_batch_segment_refuses_a_dataset_without_prompts(tmp_path, capsys):
    from medsam_plugin.cli import main

    folder = tmp_path / "d"
    crop_case(folder / "a.nii.gz", 10, 12)
    (folder / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a.nii.gz"}]}))
    assert main(["segment", "--datalist", str(folder / "dataset.json")]) == 2
    assert "No case of" in capsys.readouterr().err


def test_batch_shards_cases_by_rank():
    from medsam_plugin.dataset.batch import BatchCase

    cases = [BatchCase(str(i), "", "", "") for i in range(7)]
    shares = [cases[r::3] for r in range(3)]
    assert sorted(c.name for s in shares for c in s) == sorted(c.name for c in cases)


@pytest.mark.model
@pytest.mark.slow
def test_finetune_on_done_cases_cancels_cleanly_and_resumes(tmp_path):
    """The panel's background fine-tune on a tiny dataset: cancelled after its first checkpoint it
    leaves a whole checkpoint and resume state; resumed, it finishes and reports Dice before/after."""
    from medsam_plugin.dataset.train import FinetuneCancelled, FinetuneJob, finetune_dataset, plan_finetune

    folder = tmp_path / "tiny"
    for name, (z0, z1) in {"a": (9, 13), "b": (12, 16), "c": (14, 18)}.items():
        crop_case(folder / f"{name}.nii.gz", z0, z1, label_out=tmp_path / f"{name}_truth.nii.gz")
    ds = Dataset(folder)
    from medsam_plugin.io import read_labels, read_volume

    for c in ds.cases:
        vol = read_volume(c.image)
        ds.save_case(c.name, read_labels(tmp_path / f"{c.name}_truth.nii.gz", vol), vol, {1: "spleen"})
    plan = plan_finetune(ds)
    assert plan.val_cases == ["c"] and plan.train_cases == ["a", "b"]
    tiny = dict(base_model="lite_medsam", steps=4, val_every=1, threads=1, max_minutes=10,
                extra=("--views", "axial", "--variants", "0", "--slices-per-variant", "2", "--batch-size", "2",
                       "--max-rounds", "1", "--device", "cpu", "--bf16", "off"))
    job = FinetuneJob(plan, **tiny)
    cancel = threading.Event()
    # The trainer starts with SIGINT ignored, as a shell's background job does (napari started with
    # `&`, or this test under `nohup ... &`): the cancel must still stop it.
    import signal

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        gen = job.run(cancel)
        seen = []
        with pytest.raises(FinetuneCancelled):
            for progress in gen:
                seen.append(progress)
                if progress.done >= 1:
                    cancel.set()
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert plan.can_resume and plan.out.is_file()
    import torch

    state = torch.load(plan.resume_path, weights_only=True)
    stopped_at = int(state["step"])
    assert 1 <= stopped_at < 4
    log: list[str] = []
    outcome = yield_all(finetune_dataset(ds, resume=True, log=log, **tiny))
    assert outcome.steps == 4 and any(f"resumed at step {stopped_at}" in line for line in log)
    assert {"box", "click", "score"} <= set(outcome.before) and {"box", "click", "score"} <= set(outcome.after)
    assert outcome.val_cases == ["c"] and "held-out" in outcome.sentence()
    assert Dataset(folder).models()[-1]["path"] == str(plan.out)
    from medsam_plugin.model.registry import load_model

    assert load_model(str(plan.out), device="cpu").spec is not None  # the result loads by path


def yield_all(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


@pytest.mark.model
@pytest.mark.slow
def test_batch_segment_under_torchrun_two_processes_share_the_cases(tmp_path):
    """`torchrun --nproc_per_node=2 -m medsam_plugin.cli segment --datalist`: each rank takes every
    second case, rank 0 prints one table of all of them, and every case is written once."""
    import os

    folder = tmp_path / "cohort"
    for name, z0 in {"a": 10, "b": 11, "c": 12}.items():
        crop_case(folder / f"{name}.nii.gz", z0, z0 + 3)
    ds = Dataset(folder)
    from medsam_plugin.io import read_volume

    for c in ds.cases:
        vol = read_volume(c.image)
        lab = np.zeros(vol.data_ijk.shape, np.uint8)
        lab[60:100, 60:100, 1] = 1
        ds.save_case(c.name, lab, vol, {1: "spleen"}, prompts={"frame": "voxel", "objects": [
            {"id": 1, "name": "spleen", "boxes": [[[40, 40, 1], [120, 120, 1]]], "direction": "none"}]})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MEDSAM_PLUGIN_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "medsam_plugin.cli", "segment", "--datalist", str(folder / "dataset.json"), "--model", "lite_medsam",
           "--device", "cpu", "--out-dir", str(tmp_path / "out"), "--json", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("3 of 3 cases segmented") == 1  # one table, from rank 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in report["cases"]] == ["a", "b", "c"] and all(r["ok"] for r in report["cases"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]


def test_segment_needs_prompts_and_out_or_a_datalist(tmp_path, capsys):
    from medsam_plugin.cli import main

    image = crop_case(tmp_path / "a.nii.gz", 10, 12)
    assert main(["segment", str(image), "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "needs IMAGE, --prompts and --out" in capsys.readouterr().err
    assert main(["segment", str(image), "--datalist", str(tmp_path / "dataset.json")]) == 2
    assert "either --datalist" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
