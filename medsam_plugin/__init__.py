"""medsam_plugin: interactive 3D CT/MRI segmentation with MedSAM-family models.

Importing this package is cheap: no torch, no napari. Heavy modules load on first use.
"""

__version__ = "0.1.0"
