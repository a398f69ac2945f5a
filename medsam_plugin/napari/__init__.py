"""napari"""
