"""One cache root (io/cache.py): one environment variable, the old names still read with a warning,
and every cache folder of the plugin under it."""

from __future__ import annotations

import warnings

import pytest

from medsam_plugin.io.cache import CACHE_ENV, DEPRECATED_CACHE_ENVS, cache_root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (CACHE_ENV, *DEPRECATED_CACHE_ENVS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return monkeypatch


def test_the_root_and_its_old_names(clean_env, tmp_path):
    assert cache_root() == tmp_path / "xdg" / "medsam_plugin"
    for old in DEPRECATED_CACHE_ENVS:
        clean_env.setenv(old, str(tmp_path / old))
        with pytest.warns(DeprecationWarning, match=CACHE_ENV):
            assert cache_root() == tmp_path / old
        clean_env.delenv(old)
    clean_env.setenv(CACHE_ENV, str(tmp_path / "root"))
    clean_env.setenv(DEPRECATED_CACHE_ENVS[0], str(tmp_path / "old"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical name wins, silently
        assert cache_root() == tmp_path / "root"


def test_every_cache_lives_under_the_root(clean_env, tmp_path):
    import torch

    from medsam_plugin.model import fast, registry
    from medsam_plugin.napari import _autosave
    from medsam_plugin.training.trainer import default_cache_dir

    root = tmp_path / "root"
    clean_env.setenv(CACHE_ENV, str(root))
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"x")
    assert registry._cache_file() == root / "sha256.json"
    assert default_cache_dir() == root / "train_embeddings"
    assert _autosave.autosave_dir(scan).parent == root / "autosave"
    assert _autosave.cache_root() == root
    if fast.openvino_available():
        assert fast.openvino_ir_path(torch.nn.Linear(2, 2), 256).parent == root / "openvino"
