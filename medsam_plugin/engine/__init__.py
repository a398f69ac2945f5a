"""The segmentation engine: preprocessing, the cached slice predictor, propagation, labels."""
