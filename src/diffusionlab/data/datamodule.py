"""The LightningDataModule: one dataset, shuffled batches, optional horizontal flips."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusionlab.errors import ConfigError


class DiffusionDataModule(L.LightningDataModule):
    """Wraps a dataset built from ``dataset`` (a zero-argument factory, e.g. a Hydra partial)."""

    def __init__(
        self,
        dataset: Callable[[], Dataset] | Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        hflip: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        self._factory = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.drop_last = drop_last
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._factory() if callable(self._factory) else self._factory
            if len(self._dataset) < self.batch_size and self.drop_last:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} exceeds the dataset size {len(self._dataset)}"
                )
        return self._dataset

    def setup(self, stage: str | None = None) -> None:
        _ = self.dataset

    def _collate(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch], dtype=torch.long)
        if self.hflip and x.ndim == 4:
            flip = torch.rand(x.shape[0]) < 0.5
            x[flip] = x[flip].flip(-1)
        return x, y

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
        )
