"""What lazy datasets share: pixels are decoded per sample (in the DataLoader workers), a process
holds an index, not the images.

A lazy dataset gives the DataModule two more methods than ``__getitem__``:

- ``raw_item(i) -> (x, label)``: what a worker loads (uint8 CHW for images: a quarter of the
  bytes of float through the worker queue, pinned memory and the host-to-device copy);
- ``finish_batch(x) -> x``: called on the training device after the transfer (``[0, 255] ->
  [-1, 1]`` for images, EDM's ``x / 127.5 - 1``).

``__getitem__`` stays the plain contract of every dataset here (float CHW in [-1, 1], label), and
``images`` is a :class:`LazyImages` view for code that indexes images directly (evaluation,
reference statistics): indexing it decodes just the images asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import open_dict
from torch import Tensor
from torch.utils.data import Dataset

from diffusionlab.data.archive import CorruptFile
from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)


def uint8_to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]``: ``x / 127.5 - 1`` (NVlabs' training loop)."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class LazyImages:
    """A read-only view of a lazy dataset's images as float NCHW in [-1, 1]: ``shape``, ``len``
    and indexing by an int, a slice, a sequence or a tensor of indices decode only those."""

    ndim = 4
    dtype = torch.float32

    def __init__(self, dataset: LazyDataset) -> None:
        self.dataset = dataset

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.dataset), *self.dataset.shape))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor | np.ndarray) -> Tensor:
        if isinstance(idx, int | np.integer) or (isinstance(idx, Tensor) and idx.ndim == 0):
            return self.dataset[int(idx)][0]
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self.dataset)))
        elif isinstance(idx, Tensor | np.ndarray):
            idx = np.asarray(idx).reshape(-1).tolist()
        items = [self.dataset[int(i)][0] for i in idx]
        return torch.stack(items) if items else torch.empty(0, *self.dataset.shape)


class LazyDataset(Dataset):
    """Base of the lazy datasets: subclasses set ``shape``, ``num_classes`` and implement
    ``load(i) -> (x, label)`` (may raise :class:`CorruptFile`); ``label_array`` (int64 [N] or
    None) is the labels held in memory, when the dataset has them there."""

    shape: tuple[int, ...]
    num_classes: int
    label_array: np.ndarray | None = None
    skip_corrupt: bool = False

    def load(self, i: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def finish_batch(self, x: Tensor) -> Tensor:
        return x

    def label(self, i: int) -> int:
        return int(self.label_array[i]) if self.label_array is not None else -1

    def raw_item(self, i: int) -> tuple[Tensor, int]:
        """Sample ``i`` as stored. A corrupt file stops with its name, or with ``skip_corrupt``
        is replaced by the next readable sample (deterministic: the same on every rank)."""
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            try:
                return self.load(j)
            except CorruptFile as e:
                if not self.skip_corrupt:
                    raise ConfigError(f"{e}; remove it or set dataset.skip_corrupt=true") from None
                log.warning("skipping %s", e)
        raise ConfigError("no file of the dataset could be read")

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, label = self.raw_item(i)
        return self.finish_batch(x[None])[0], label

    @property
    def images(self) -> LazyImages:
        return LazyImages(self)

    @property
    def labels(self) -> Tensor | None:
        return None if self.label_array is None else torch.from_numpy(self.label_array)


FROM_FILES = ("channels", "resolution", "num_classes")


def fill_from_files(cfg_dataset: Any, dataset: Dataset) -> None:
    """Set the keys of ``cfg_dataset`` left null that the files decide (``channels``,
    ``resolution``, ``num_classes`` of ``dataset=zip`` / ``latents`` / ``streaming``) to the
    dataset's values, so the model configs that interpolate them are built for the data."""
    shape = getattr(dataset, "shape", ())
    if len(shape) != 3:
        return
    values = {"channels": shape[0], "resolution": shape[-1], "num_classes": dataset.num_classes}
    with open_dict(cfg_dataset):
        for key in FROM_FILES:
            if key in cfg_dataset and cfg_dataset[key] is None:
                cfg_dataset[key] = int(values[key])
