"""Datasets (images float NCHW in [-1, 1] plus integer labels) and the DataModule.

Names are imported on first use, so tools that only read or write datasets (``dl-dataset``)
do not pay for importing Lightning."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DiffusionDataModule": "diffusionlab.data.datamodule",
    "TensorImageDataset": "diffusionlab.data.datasets",
    "Toy2D": "diffusionlab.data.datasets",
    "cifar10": "diffusionlab.data.datasets",
    "digits": "diffusionlab.data.datasets",
    "image_folder": "diffusionlab.data.datasets",
    "mnist": "diffusionlab.data.datasets",
    "toy2d_points": "diffusionlab.data.datasets",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'diffusionlab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
