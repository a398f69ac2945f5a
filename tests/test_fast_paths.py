"""The fast image-encoder paths: same masks as fp32, the right choice per machine, a way to force fp32.

No timings here (speed lives in benchmarks/run_all.py). The OpenVINO f32 path, the default where
OpenVINO is installed, is converted once into a temporary cache and checked against fp32 (about
10 s); the bf16 ones are only chosen, not built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsam_plugin.model import fast

pytestmark = pytest.mark.model


def _mask(loaded, encoder, spleen_slice):
    from medsam_plugin.engine.predictor import SlicePredictor

    volume, z, box, _ = spleen_slice
    predictor = SlicePredictor(loaded, encoder=encoder)
    predictor.set_volume(volume)
    return predictor.predict(z, box_xyxy=box).mask_yx, predictor


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name", ["fp32-fast", "bf16"])
def test_fast_paths_give_the_fp32_mask(lite_medsam, spleen_slice, name):
    reference, ref_predictor = _mask(lite_medsam, None, spleen_slice)
    path = fast.build_path(lite_medsam, name)
    mask, predictor = _mask(lite_medsam, path, spleen_slice)
    assert _dice(mask, reference) > 0.99
    assert _dice(mask, spleen_slice[3]) > 0.9
    x = torch.rand(2, 3, 256, 256)  # a batch of two, as precompute sends them
    with torch.inference_mode():
        ref = lite_medsam.sam.image_encoder(x)
    out = path(x)
    assert out.shape == ref.shape == (2, 256, 64, 64) and out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (1e-4 if name == "fp32-fast" else 0.1)
    # A fast path's embeddings never share disk-cache keys with fp32 ones.
    assert predictor.model_key != ref_predictor.model_key and name in predictor.model_key


def test_the_fast_model_does_not_touch_the_source_model(lite_medsam):
    before = {k: v.clone() for k, v in lite_medsam.sam.image_encoder.state_dict().items()}
    fast.build_path(lite_medsam, "bf16")
    after = lite_medsam.sam.image_encoder.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_auto_falls_back_without_native_bf16(lite_medsam, monkeypatch, caplog):
    monkeypatch.delenv(fast.ENV_VAR, raising=False)
    monkeypatch.setattr(fast, "cpu_bf16_support", lambda: (False, "CPU lacks amx_bf16/avx512_bf16 (test)"))
    monkeypatch.setattr(fast, "openvino_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="medsam_plugin.model.fast"):
        path = fast.make_encoder(lite_medsam)
    assert path.name == "fp32-fast" and path.dtype == torch.float32
    assert "image encoder: fp32-fast" in caplog.text and "lacks" in caplog.text
    monkeypatch.setattr(fast, "openvino_available", lambda: True)
    assert fast.choose_mode(lite_medsam)[0] == "openvino-f32"


def test_auto_keeps_fp32_numerics_and_bf16_is_opt_in(lite_medsam, monkeypatch, caplog):
    monkeypatch.delenv(fast.ENV_VAR, raising=False)
    monkeypatch.setattr(fast, "cpu_bf16_support", lambda: (True, "CPU has amx_bf16 (test)"))
    monkeypatch.setattr(fast, "openvino_available", lambda: False)
    assert fast.choose_mode(lite_medsam)[0] == "fp32-fast"
    monkeypatch.setattr(fast, "openvino_available", lambda: True)
    assert fast.choose_mode(lite_medsam)[0] == "openvino-f32"
    monkeypatch.setenv(fast.ENV_VAR, "bf16")
    with caplog.at_level(logging.INFO, logger="medsam_plugin.model.fast"):
        path = fast.make_encoder(lite_medsam)
    assert path.name == "bf16" and "MEDSAM_ENCODER=bf16" in caplog.text


def test_the_capability_check_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(fast, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert fast.cpu_bf16_support()[0] is False
    monkeypatch.setattr(fast, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert fast.cpu_bf16_support()[0] is True


def test_fp32_can_be_forced_by_argument_and_by_environment(lite_medsam, monkeypatch, caplog):
    monkeypatch.delenv(fast.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="medsam_plugin.model.fast"):
        assert fast.make_encoder(lite_medsam, mode="fp32") is None
    assert "fp32 eager" in caplog.text
    monkeypatch.setenv(fast.ENV_VAR, "fp32")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsam_plugin.model.fast"):
        assert fast.make_encoder(lite_medsam, mode="bf16") is None  # the environment wins
    assert "MEDSAM_ENCODER=fp32" in caplog.text
    monkeypatch.setenv(fast.ENV_VAR, "fastest-please")
    with pytest.raises(ValueError, match="MEDSAM_ENCODER"):
        fast.make_encoder(lite_medsam)


def test_the_session_uses_the_chosen_path(sample_dir, lite_medsam, monkeypatch):
    from medsam_plugin.engine.session import SegmentationSession
    from medsam_plugin.io import read_volume

    monkeypatch.setenv(fast.ENV_VAR, "fp32-fast")
    session = SegmentationSession(read_volume(sample_dir / "ct_spleen_msd_spleen2_crop" / "image.nii.gz"),
                                  loaded_model=lite_medsam)
    assert "encoder=fp32-fast" in session.predictor.model_key


def test_cuda_path_is_bf16_and_batched_by_construction(lite_medsam, monkeypatch):
    """No GPU here: the choice on a CUDA device is checked with a stand-in, the bf16 module on CPU."""
    monkeypatch.delenv(fast.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Stand-in GPU")
    on_cuda = SimpleNamespace(sam=lite_medsam.sam, spec=lite_medsam.spec, device=torch.device("cuda"))
    assert fast.choose_mode(on_cuda)[0] == "fp32-fast"  # fp32 numerics by default, batched
    assert fast.choose_mode(on_cuda, "bf16")[0] == "bf16"
    # OpenVINO is CPU-only: asking for it on CUDA gives the torch path instead.
    monkeypatch.setattr(fast, "openvino_available", lambda: True)
    assert fast.choose_mode(on_cuda, "openvino-bf16")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fast.choose_mode(on_cuda, "openvino-bf16")[0] == "fp32-fast"


def test_precompute_batches_by_the_paths_preference(lite_medsam, spleen_slice):
    from medsam_plugin.engine.predictor import SlicePredictor

    calls = []

    class Recording:
        key = "encoder=recording"
        preferred_batch = 3

        def __call__(self, x):
            calls.append(x.shape[0])
            return torch.zeros(x.shape[0], 256, 64, 64)

    predictor = SlicePredictor(lite_medsam, encoder=Recording())
    predictor.set_volume(spleen_slice[0][:7])
    assert list(predictor.precompute()) == [3, 6, 7]
    assert calls == [3, 3, 1]
    assert "encoder=recording" in predictor.model_key


def test_asking_for_bf16_without_native_support_falls_back(lite_medsam, monkeypatch):
    monkeypatch.delenv(fast.ENV_VAR, raising=False)
    monkeypatch.setattr(fast, "cpu_bf16_support", lambda: (False, "CPU lacks amx_bf16/avx512_bf16 (test)"))
    name, why = fast.choose_mode(lite_medsam, "bf16")
    assert name == "fp32-fast" and "emulated" in why


def _printed_by_python(code: str) -> list[str]:
    """What a fresh interpreter running `code` prints, split into words (imports start clean)."""
    import subprocess
    import sys

    _require_openvino()
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_openvino_is_imported_without_its_usage_telemetry():
    """Importing openvino would otherwise report usage to Intel; this tool never sends anything."""
    out = _printed_by_python(
        "import sys; from medsam_plugin.model.fast import import_openvino; import_openvino(); "
        "import openvino.tools.ovc.telemetry_utils as t, openvino.tools.ovc.convert_impl as c; "
        "print(t.tm.__name__, c.tm.__name__, sys.modules.get('openvino_telemetry'))")
    assert out == ["openvino.tools.ovc.telemetry_stub", "openvino.tools.ovc.telemetry_stub", "None"]


def test_openvino_imported_first_still_sends_nothing_through_this_tool():
    """A user's `import openvino` before medsam_plugin: the converter is pointed at the stub and the
    telemetry object's consent is off, so nothing medsam_plugin does afterwards reports anything."""
    out = _printed_by_python(
        "import openvino, openvino_telemetry; from medsam_plugin.model.fast import import_openvino; "
        "import_openvino(); import openvino.tools.ovc.telemetry_utils as t, openvino.tools.ovc.convert_impl as c; "
        "print(t.tm.__name__, c.tm.__name__, openvino_telemetry.Telemetry().consent)")
    assert out == ["openvino.tools.ovc.telemetry_stub", "openvino.tools.ovc.telemetry_stub", "False"]


def _home_after(code: str, home) -> list[str]:
    """The files under `home` after a fresh interpreter with HOME=`home` ran `code`."""
    import os
    import subprocess
    import sys

    _require_openvino()
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # OpenVINO's telemetry is off on CI machines anyway: test the user's case
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_importing_medsam_plugin_first_keeps_openvino_from_reporting(tmp_path):
    """Issue 21: `import openvino` sends an analytics request and writes ~/intel/openvino_ga_cid.
    medsam_plugin imported first hides the telemetry package, so OpenVINO imported afterwards
    (by the user, or by this tool) writes and sends nothing."""
    assert _home_after("import medsam_plugin, openvino, openvino.tools.ovc", tmp_path) == []


def test_the_readmes_opt_out_silences_openvino_imported_first(tmp_path):
    """`import openvino, medsam_plugin`: OpenVINO's import runs before any code of this project, which
    cannot stop it; the README gives OpenVINO's own opt-out (its consent file), which does."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "printf 0 > ~/intel/openvino_telemetry" in readme
    first = tmp_path / "first"
    first.mkdir()
    assert "intel/openvino_ga_cid" in _home_after("import openvino, medsam_plugin", first)  # what the README is for
    opted = tmp_path / "opted"
    (opted / "intel").mkdir(parents=True)
    (opted / "intel" / "openvino_telemetry").write_text("0")
    assert _home_after("import openvino, medsam_plugin", opted) == ["intel/openvino_telemetry"]


def test_a_damaged_cached_openvino_model_is_removed_and_not_used(tmp_path, caplog):
    """The IR cache checks itself: files that differ from the checksums recorded at conversion (here
    a zeroed block of weights, which OpenVINO would still load) are removed, so the model is converted
    again instead of serving wrong embeddings."""
    from medsam_plugin.io.atomic import atomic_write_json

    xml = tmp_path / "openvino" / "tiny_vit_0123456789abcdef.xml"
    xml.parent.mkdir()
    xml.write_text("<net/>")
    xml.with_suffix(".bin").write_bytes(bytes(range(256)) * 64)
    atomic_write_json(fast._ir_sums_path(xml), fast._ir_checksums(xml))
    assert fast._ir_intact(xml)
    data = bytearray(xml.with_suffix(".bin").read_bytes())
    data[1024:2048] = bytes(1024)
    xml.with_suffix(".bin").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="medsam_plugin.model.fast"):
        assert not fast._ir_intact(xml)
    assert "damaged" in caplog.text and not list(xml.parent.iterdir())
    xml.write_text("<net/>")  # an IR without recorded checksums (planted, or from an older version)
    xml.with_suffix(".bin").write_bytes(b"x")
    assert not fast._ir_intact(xml) and not xml.exists()


def _require_openvino() -> None:
    """Skip without OpenVINO; never `pytest.importorskip("openvino")`, whose plain import in the test
    process would switch OpenVINO's usage telemetry on before medsam_plugin can hide it."""
    if not fast.openvino_available():
        pytest.skip("OpenVINO is optional (the `fast` extra)")


def test_the_openvino_body_is_the_encoder_in_another_layout(lite_medsam):
    """What OpenVINO converts (channels-last in, 4-D permutes, split qkv) computes the encoder's maths."""
    encoder = lite_medsam.sam.image_encoder
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = encoder(x)
        tokens = fast._Embed(encoder)(x)
        out = fast._EncoderBody(encoder)(tokens)
    assert tokens.shape == (1, 256, 256, 64) and tokens.is_contiguous()
    assert out.shape == reference.shape
    assert float((out - reference).norm() / reference.norm()) < 1e-5  # BN folding's rounding only


def test_openvino_f32_path_gives_the_fp32_embedding_and_mask(lite_medsam, spleen_slice, tmp_path):
    """Converted with `torch.export` (issue 21: not `torch.jit.trace`, which torch deprecates), said
    aloud with an estimate, kept for later runs, and the encoder's fp32 embedding of real slices."""
    import warnings

    from medsam_plugin.engine.preprocessing import slices_to_model_input

    _require_openvino()
    assert fast.pending_conversion_s(lite_medsam, "openvino-f32", tmp_path) == fast.DEFAULT_CONVERSION_S
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = fast.build_path(lite_medsam, "openvino-f32", cache_dir=tmp_path,
                               on_progress=lambda message, seconds: said.append((message, seconds)))
    assert not [str(w.message) for w in caught if "jit" in str(w.message)]
    assert said[0] == (f"Preparing the fast encoder (one time, about {fast.DEFAULT_CONVERSION_S:.0f} s)...",
                       fast.DEFAULT_CONVERSION_S)
    assert said[-1][0].startswith("The fast encoder is ready") and "for later runs" in said[-1][0]
    assert path.converted and list(tmp_path.glob("openvino/*.xml"))
    kept = sorted(p.name[p.name.index("."):] for p in (tmp_path / "openvino").glob("tiny_vit_*"))
    assert kept == [".bin", ".sha256.json", ".xml"]  # written as one set, nothing left behind
    assert not [p for p in (tmp_path / "openvino").iterdir() if ".tmp" in p.name]
    # The next conversion on this machine is announced with this one's measured time.
    assert fast.conversion_estimate_s(tmp_path) == pytest.approx(path.conversion_s, abs=0.1)
    assert fast.pending_conversion_s(lite_medsam, "openvino-f32", tmp_path) is None  # nothing left to convert
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    volume, z, _, _ = spleen_slice
    real, _ = slices_to_model_input(volume[[z, z - 3]], 256, lite_medsam.spec.normalization)
    for batch in (x, real):
        with torch.inference_mode():
            reference = lite_medsam.sam.image_encoder(batch)
        out = path(batch)
        assert out.shape == (2, 256, 64, 64) and out.dtype == torch.float32
        assert float((out - reference).norm() / reference.norm()) < 1e-4
    said.clear()
    again = fast.build_path(lite_medsam, "openvino-f32", cache_dir=tmp_path, on_progress=lambda *a: said.append(a))
    assert not again.converted and not said  # the IR is reused, and nothing long is announced
    reference_mask, _ = _mask(lite_medsam, None, spleen_slice)
    mask, _ = _mask(lite_medsam, path, spleen_slice)
    assert _dice(mask, reference_mask) > 0.999
