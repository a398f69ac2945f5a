"""The napari manifest: valid, every python_name imports, and napari finds it from the install."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "napari.yaml"
PACKAGED = REPO / "medsam_plugin" / "napari.yaml"


def _commands():
    return yaml.safe_load(MANIFEST.read_text())["contributions"]["commands"]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: c["id"])
def test_every_python_name_imports(command):
    module_name, _, attr = command["python_name"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), f"{command['python_name']} is not callable"


def test_packaged_manifest_is_the_top_level_one():
    """medsam_plugin/napari.yaml (what wheels and editable installs ship) is the canonical file."""
    assert PACKAGED.read_text() == MANIFEST.read_text()


def test_manifest_validates_with_npe2():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "medsam-plugin"
    kinds = manifest.contributions
    assert kinds.readers and kinds.writers and kinds.widgets and kinds.sample_data
    assert "labels" in [str(t).lower().split(".")[-1] for t in kinds.writers[0].layer_types]


def test_entry_point_resolves_to_the_manifest():
    """The installed distribution (editable or wheel) points napari at the manifest."""
    from importlib.metadata import PackageNotFoundError, entry_points

    try:
        importlib.metadata.distribution("medsam-plugin")
    except PackageNotFoundError:
        pytest.skip("medsam-plugin is not installed (pip install -e .): no entry point to check.")
    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "medsam-plugin"]
    assert eps, "no napari.manifest entry point named medsam-plugin"
    module, _, resource = eps[0].value.partition(":")
    path = importlib.resources.files(module) / resource
    assert path.is_file()
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "medsam-plugin" in {m.name for m in pm.iter_manifests()}
