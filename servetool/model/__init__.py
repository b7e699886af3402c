"""The model layer: what a model is before anything converts or serves it.

The spec (servetool.yaml -> ModelSpec), the readers of model files and their metadata (Hugging
Face folders, timm and ultralytics exports, TorchScript/.pt2/state_dict files), the format table,
COCO-labelled data, and every sample input (samples.py: examples, validation and calibration data,
the representative texts). Nothing here imports a layer above it.
"""
