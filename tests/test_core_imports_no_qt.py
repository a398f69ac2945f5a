"""The core (everything but medsam_plugin.napari) imports no Qt, napari or magicgui."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import medsam_plugin

FORBIDDEN = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")


def core_modules() -> list[str]:
    names = ["medsam_plugin"]
    for info in pkgutil.walk_packages(medsam_plugin.__path__, prefix="medsam_plugin."):
        if info.name.startswith("medsam_plugin.napari"):
            continue
        names.append(info.name)
    return sorted(names)


def test_core_modules_exist():
    names = core_modules()
    for expected in ("medsam_plugin.io", "medsam_plugin.engine.session", "medsam_plugin.cli",
                     # the dataset worklist's core, under the napari Dataset panel
                     "medsam_plugin.dataset", "medsam_plugin.dataset.store", "medsam_plugin.dataset.replay",
                     "medsam_plugin.dataset.batch", "medsam_plugin.dataset.train"):
        assert expected in names


def test_core_imports_no_qt_or_napari():
    code = (
        "import importlib, json, sys\n"
        f"names = {core_modules()!r}\n"
        "failed = {}\n"
        "for n in names:\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        failed[n] = repr(e)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps({'bad': bad, 'failed': failed}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, f"core modules failed to import: {result['failed']}"
    assert result["bad"] == [], f"the core imported GUI modules: {result['bad']}"


def test_napari_package_import_is_light():
    """Importing the plugin's reader/writer modules pulls in neither Qt nor torch."""
    code = (
        "import sys, json\n"
        "import medsam_plugin.napari._reader, medsam_plugin.napari._writer, medsam_plugin.napari._sample_data\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'qtpy', 'PyQt5', 'napari'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
