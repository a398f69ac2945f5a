"""medsam_plugin: interactive 3D CT/MRI segmentation with MedSAM-family models.

Importing this package is cheap: no torch, no napari. Heavy modules load on first use.
"""

__version__ = "0.1.0"

# OpenVINO (the fast encoder) reports usage to Intel from its import on; this tool sends nothing.
from ._telemetry import hide_openvino_telemetry as _hide_openvino_telemetry  # noqa: E402

_hide_openvino_telemetry()
