"""Datasets (images float NCHW in [-1, 1] plus integer labels) and the DataModule."""

from diffusionlab.data.datamodule import DiffusionDataModule
from diffusionlab.data.datasets import (
    TensorImageDataset,
    Toy2D,
    cifar10,
    digits,
    image_folder,
    mnist,
    toy2d_points,
)

__all__ = [
    "DiffusionDataModule",
    "TensorImageDataset",
    "Toy2D",
    "cifar10",
    "digits",
    "image_folder",
    "mnist",
    "toy2d_points",
]
