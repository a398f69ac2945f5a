"""Issue 21: the io modules do not import each other in a circle (readers, writers and dicom_seg did)."""

from __future__ import annotations

import ast
from pathlib import Path

IO = Path(__file__).resolve().parents[1] / "medsam_plugin" / "io"


def _io_imports(path: Path) -> set[str]:
    """The io modules a module imports, at module level or inside functions (`from .x import`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in IO.glob("*.py")}


def test_no_import_circle_between_io_modules():
    graph = {p.stem: _io_imports(p) for p in IO.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join([*path, module, dep]))
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert {"readers", "writers", "dicom_seg"} <= set(graph)  # the three that used to form one
