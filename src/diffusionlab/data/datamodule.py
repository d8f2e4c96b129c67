"""The LightningDataModule: one dataset read as an endless step-indexed stream (``sampler.py``),
sharded over ranks, with optional horizontal flips; ``batch_size`` is the global batch."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusionlab.data.sampler import BatchLayout, PositionedDataset, StepSampler
from diffusionlab.errors import ConfigError


class DiffusionDataModule(L.LightningDataModule):
    """Wraps a dataset built from ``dataset`` (a zero-argument factory, e.g. a Hydra partial)."""

    def __init__(
        self,
        dataset: Callable[[], Dataset] | Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        hflip: bool = False,
        batch_per_device: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        self._factory = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.batch_per_device = batch_per_device
        self.seed = seed
        # data position: global sample ``_start_position`` begins optimizer step ``_start_step``
        self._start_position = 0
        self._start_step = 0
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._factory() if callable(self._factory) else self._factory
            if len(self._dataset) < self.batch_size:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} exceeds the dataset size {len(self._dataset)}"
                )
        return self._dataset

    def setup(self, stage: str | None = None) -> None:
        _ = self.dataset

    def layout(self, world_size: int) -> BatchLayout:
        """The split of the global batch over ``world_size`` ranks and micro-batches."""
        return BatchLayout.derive(self.batch_size, world_size, self.batch_per_device)

    def position(self, global_step: int) -> int:
        """Global sample position where optimizer step ``global_step`` starts."""
        return self._start_position + (global_step - self._start_step) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        step = self.trainer.global_step if self.trainer is not None else self._start_step
        return {"position": self.position(step), "step": step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start_position, self._start_step = int(state["position"]), int(state["step"])

    @staticmethod
    def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch], dtype=torch.long)
        seeds = torch.tensor([b[2] for b in batch], dtype=torch.long)
        return x, y, seeds

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank, step = (
            (trainer.world_size, trainer.global_rank, trainer.global_step) if trainer else (1, 0, 0)
        )
        sampler = StepSampler(
            len(self.dataset), self.layout(world), rank, self.seed, self.position(step)
        )
        return DataLoader(
            PositionedDataset(self.dataset, self.seed, self.hflip),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
            # its own generator: creating the loader iterator must not consume the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
