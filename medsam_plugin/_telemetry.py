"""Keep OpenVINO's usage telemetry out of every process that imports medsam_plugin.

`import openvino` imports `openvino_telemetry`, which sends an analytics request to Intel and
writes ~/intel/openvino_ga_cid unless the user opted out. Imported before `openvino`, this module
hides that package (OpenVINO then uses its own no-op stub): nothing is sent, nothing is written.
It cannot undo what an `import openvino` that came first has done; the README says how to opt out
for good. Deliberately light: no torch, no openvino import here.
"""

from __future__ import annotations

import sys


def hide_openvino_telemetry() -> bool:
    """Hide the `openvino_telemetry` package unless it is imported already; True when it is hidden now."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  (an import of it now fails: the stub)
    return sys.modules["openvino_telemetry"] is None
