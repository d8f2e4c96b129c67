"""Global batch layout and the endless, step-indexed sample stream (EDM's ``batch`` / ``batch_gpu``).

The run reads the concatenation of per-epoch permutations (epoch ``e`` shuffled by a generator
seeded from ``(seed, e)``) as one endless sequence of *global sample positions* 0, 1, 2, ...
Optimizer step ``s`` trains on positions ``s*B .. s*B + B - 1`` (``B`` = global batch); rank ``r``
takes the contiguous slice ``r*b .. r*b + b - 1`` of it (``b = B / world_size``) in ``b / m``
micro-batches of ``m`` (gradient accumulation). Every random choice for a training sample
(sigma, noise, flip, augmentation, dropout) comes from ``sample_seed(seed, position, stream)``
(the seed scheme lives in ``diffusion/seeds.py``), so a step's gradient is the same however the
batch is split, and a resumed run replays the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from diffusionlab.diffusion.seeds import (
    CAPTION_STREAM,
    EPOCH_STREAM,
    FLIP_STREAM,
    NOISE_STREAM,
    sample_seed,
)
from diffusionlab.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: ``global_batch = world_size * accumulation * micro_batch``."""

    global_batch: int
    world_size: int
    per_device: int
    micro_batch: int

    @property
    def accumulation(self) -> int:
        return self.per_device // self.micro_batch

    @classmethod
    def derive(
        cls, batch_size: int, world_size: int, batch_per_device: int | None = None
    ) -> BatchLayout:
        """Per-device batch ``batch_size / world_size``; micro-batches of at most
        ``batch_per_device`` (None = no cap) that divide it exactly."""
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} (the global batch) is not divisible by the world "
                f"size {world_size} (trainer.devices x trainer.num_nodes)"
            )
        per_device = batch_size // world_size
        micro = per_device if batch_per_device is None else int(batch_per_device)
        if micro < 1:
            raise ConfigError(f"data.batch_per_device={batch_per_device} must be >= 1 or null")
        micro = min(micro, per_device)
        if per_device % micro:
            raise ConfigError(
                f"data.batch_per_device={batch_per_device} does not divide the per-device batch "
                f"{per_device} (data.batch_size={batch_size} / world size {world_size})"
            )
        return cls(batch_size, world_size, per_device, micro)


class StepSampler:
    """Endless batch sampler of one rank: yields micro-batches of ``(dataset index, position)``.

    Starts at global position ``start`` (a multiple of the global batch at a step boundary), so
    a resumed run continues inside an epoch exactly where the checkpoint stopped.
    """

    def __init__(
        self, num_samples: int, layout: BatchLayout, rank: int = 0, seed: int = 0, start: int = 0
    ) -> None:
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside world size {layout.world_size}")
        self.num_samples = num_samples
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.start = start
        self._epoch = -1
        self._perm: list[int] = []

    def permutation(self, epoch: int) -> list[int]:
        """The dataset order of ``epoch`` (a function of ``(seed, epoch)`` only)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, EPOCH_STREAM))
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    def index(self, position: int) -> int:
        """Dataset index read at global sample ``position``."""
        epoch, offset = divmod(position, self.num_samples)
        return self.permutation(epoch)[offset]

    def micro_batch(self, k: int) -> list[tuple[int, int]]:
        """The ``k``-th micro-batch of this rank after ``start``."""
        lay = self.layout
        step, j = divmod(k, lay.accumulation)
        first = self.start + step * lay.global_batch + self.rank * lay.per_device
        first += j * lay.micro_batch
        return [(self.index(p), p) for p in range(first, first + lay.micro_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = 0
        while True:
            yield self.micro_batch(k)
            k += 1


class PositionedDataset(Dataset):
    """Reads ``(index, position)`` keys: returns ``(x, label, noise seed)``; flips images
    horizontally with probability 1/2 from the sample's own seed when ``hflip``. Extras come
    fourth, as a dict: with ``views`` the un-augmented view the sample is, ``2 * index + flipped``
    (per-image caches of frozen-encoder features, training/repa.py); with ``caption(index,
    choice)`` (a captioned dataset) the sample's caption, picked among the image's captions by
    its own seed."""

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        hflip: bool = False,
        views: bool = False,
        caption: Callable[[int, int], str] | None = None,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.hflip = hflip
        self.views = views
        self.caption = caption

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        x, label = self.dataset[index]
        flip = (
            self.hflip and x.ndim == 3 and bool(sample_seed(self.seed, position, FLIP_STREAM) & 1)
        )
        if flip:
            x = x.flip(-1)
        seed = sample_seed(self.seed, position, NOISE_STREAM)
        extras: dict = {}
        if self.views:
            extras["views"] = 2 * index + flip
        if self.caption is not None:
            extras["captions"] = self.caption(
                index, sample_seed(self.seed, position, CAPTION_STREAM)
            )
        return (x, label, seed, extras) if extras else (x, label, seed)
