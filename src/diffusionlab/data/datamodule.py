"""The LightningDataModule: one dataset read as an endless step-indexed stream (``sampler.py``),
sharded over ranks, with optional horizontal flips; ``batch_size`` is the global batch.

Lazy datasets (``lazy.py``) are loaded as stored (uint8 images) by the workers and finished on
the training device after the transfer (``on_after_batch_transfer``); a dataset with chunks
(``streaming.py``) is read in a chunk-aware order. Loader settings left ``auto`` follow the
accelerator: on a GPU, worker processes for lazy datasets, pinned memory, persistent workers;
on the CPU, the main process (the default run's speed)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusionlab.data.sampler import BatchLayout, PositionedDataset, StepSampler
from diffusionlab.errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class LoaderSettings:
    """The DataLoader options a run uses, after ``auto`` is resolved."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    @classmethod
    def resolve(
        cls,
        num_workers: int | str,
        pin_memory: bool | str,
        persistent_workers: bool,
        prefetch_factor: int | str | None,
        *,
        on_gpu: bool,
        lazy: bool,
        local_processes: int = 1,
    ) -> LoaderSettings:
        """``auto``: on a GPU, ``min(8, CPUs per local process - 1)`` workers (at least 1) for a
        lazy dataset and none for one in memory, pinned memory, 2 batches prefetched per worker;
        on the CPU no workers and no pinning."""
        if num_workers == AUTO:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            per_process = max(1, (cpus or 1) // max(1, local_processes))
            num_workers = max(1, min(8, per_process - 1)) if on_gpu and lazy else 0
        elif not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be an integer >= 0 or auto")
        if pin_memory == AUTO:
            pin_memory = on_gpu
        elif not isinstance(pin_memory, bool):
            raise ConfigError(f"data.pin_memory={pin_memory!r} must be true, false or auto")
        if prefetch_factor == AUTO:
            prefetch_factor = 2 if num_workers else None
        elif prefetch_factor is not None and (
            not isinstance(prefetch_factor, int) or prefetch_factor < 1
        ):
            raise ConfigError(
                f"data.prefetch_factor={prefetch_factor!r} must be >= 1, auto or null"
            )
        if not num_workers:
            prefetch_factor = None  # torch refuses it without workers
        return cls(
            int(num_workers),
            bool(pin_memory),
            bool(persistent_workers and num_workers),
            prefetch_factor,
        )


class _Stored(Dataset):
    """A lazy dataset's samples as stored (``raw_item``), for the worker processes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset.raw_item(i)


class Collate:
    """``[(x, label, seed), ...] -> (x, labels, seeds)``; a dataset's ``prepare_batch(x, seeds)``
    (per-sample draws from each sample's seed, e.g. a latent from its posterior) runs here, in
    the worker. Items with a fourth entry (a dict of extras, :class:`PositionedDataset`) add a
    fourth one: ``{"views": LongTensor, "captions": [str, ...]}`` with the keys the items have."""

    def __init__(self, prepare: Callable | None = None) -> None:
        self.prepare = prepare

    def __call__(self, batch: list) -> tuple:
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch], dtype=torch.long)
        seeds = torch.tensor([b[2] for b in batch], dtype=torch.long)
        if self.prepare is not None:
            x = self.prepare(x, seeds)
        if len(batch[0]) > 3:
            extras = {}
            for key in batch[0][3]:
                values = [b[3][key] for b in batch]
                extras[key] = torch.tensor(values) if key == "views" else values
            return x, y, seeds, extras
        return x, y, seeds


class DiffusionDataModule(L.LightningDataModule):
    """Wraps a dataset built from ``dataset`` (a zero-argument factory, e.g. a Hydra partial)."""

    def __init__(
        self,
        dataset: Callable[[], Dataset] | Dataset,
        batch_size: int = 64,
        num_workers: int | str = AUTO,
        hflip: bool = False,
        batch_per_device: int | None = None,
        seed: int = 0,
        pin_memory: bool | str = AUTO,
        persistent_workers: bool = True,
        prefetch_factor: int | str | None = AUTO,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        self._factory = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.hflip = hflip
        self.batch_per_device = batch_per_device
        self.seed = seed
        # batches carry each sample's view (2 * index + flipped) among their extras; the training
        # app sets it for per-image feature caches (repa=..., training/repa.py)
        self.views = False
        # data position: global sample ``_start_position`` begins optimizer step ``_start_step``
        self._start_position = 0
        self._start_step = 0
        self._dataset: Dataset | None = None
        self.loader_settings(on_gpu=False)  # a bad value stops here, before any training

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._factory() if callable(self._factory) else self._factory
            if len(self._dataset) < self.batch_size:
                raise ConfigError(
                    f"data.batch_size={self.batch_size} exceeds the dataset size {len(self._dataset)}"
                )
        return self._dataset

    @property
    def lazy(self) -> bool:
        """True when the dataset decodes per sample (``raw_item``) rather than holding tensors."""
        return hasattr(self.dataset, "raw_item")

    captions: bool = False  # set by the training app for cond=text: batches carry captions

    @property
    def caption_reader(self):
        """The dataset's ``caption(index, choice)`` when the model reads captions, else None."""
        return getattr(self.dataset, "caption", None) if self.captions else None

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

    def loader_settings(self, on_gpu: bool, local_processes: int = 1) -> LoaderSettings:
        lazy = self._dataset is not None and self.lazy
        return LoaderSettings.resolve(
            self.num_workers,
            self.pin_memory,
            self.persistent_workers,
            self.prefetch_factor,
            on_gpu=on_gpu,
            lazy=lazy,
            local_processes=local_processes,
        )

    def sampler(self, world_size: int, rank: int, step: int) -> StepSampler:
        """This rank's endless batch sampler from optimizer step ``step`` on."""
        make = getattr(self.dataset, "step_sampler", None)
        args = (self.layout(world_size), rank, self.seed, self.position(step))
        if make is not None:  # chunked storage: a chunk-aware order (streaming.py)
            return make(*args)
        return StepSampler(len(self.dataset), *args)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank, step = (
            (trainer.world_size, trainer.global_rank, trainer.global_step) if trainer else (1, 0, 0)
        )
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        settings = self.loader_settings(on_gpu, trainer.num_devices if trainer else 1)
        data = _Stored(self.dataset) if self.lazy else self.dataset
        # workers fork (sharing the index copy-on-write) even in a rank started by spawn
        # (ddp_spawn), whose default would start each worker as a new interpreter
        fork = settings.num_workers and "fork" in multiprocessing.get_all_start_methods()
        return DataLoader(
            PositionedDataset(data, self.seed, self.hflip, self.views, self.caption_reader),
            batch_sampler=self.sampler(world, rank, step),
            num_workers=settings.num_workers,
            collate_fn=Collate(getattr(self.dataset, "prepare_batch", None)),
            pin_memory=settings.pin_memory,
            persistent_workers=settings.persistent_workers,
            prefetch_factor=settings.prefetch_factor,
            multiprocessing_context="fork" if fork else None,
            # its own generator: creating the loader iterator must not consume the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )

    def finish(self, batch: Any) -> Any:
        """A loaded batch ``(x, labels, seeds)`` made ready for the model (a lazy dataset's
        ``finish_batch``: uint8 -> [-1, 1]); Lightning calls it on the device after transfer."""
        finish = getattr(self.dataset, "finish_batch", None)
        if finish is None or not self.lazy:
            return batch
        x, *rest = batch
        return (finish(x), *rest)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.finish(batch)
