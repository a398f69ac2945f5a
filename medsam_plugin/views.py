"""The slicing views, in one light module: the command lines build their choices from it without
importing the io package (nibabel, SimpleITK). `io.orientation.VIEW_AXCODES` gives each its axes."""

VIEWS = ("axial", "coronal", "sagittal")
