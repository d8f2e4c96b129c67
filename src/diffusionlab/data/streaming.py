"""``dataset=streaming``: LitData chunks (``dl-dataset convert ... format=litdata``) on local disk
or object storage (``s3://``, ``gs://``; LitData downloads chunks into a node-local cache), read
by sample index in a chunk-aware order that keeps the data stream's guarantees.

The order (:class:`ChunkedStepSampler`) is a function of ``(seed, epoch)`` and the chunk sizes
only, never of the world size:

1. the epoch's chunk order is a seeded permutation of the chunks;
2. consecutive chunks of that order form windows of ``window_chunks`` chunks; the samples of a
   window are shuffled together and the windows concatenated: the epoch's permutation;
3. optimizer step ``s`` takes global positions ``s*B .. s*B+B-1`` of the concatenated epochs
   (as ``StepSampler``), so a step's samples and their seeds do not depend on the world size
   and a resumed run replays exactly;
4. within the step, samples are sorted by chunk before the per-rank / per-micro-batch slices
   are cut, so each rank reads from about ``window_chunks / world_size + 1`` chunks at a time
   instead of all of them (which samples a rank computes changes with the world size; the step's
   gradient, a mean over the global batch, does not).

What it costs is in docs/data.md: batches mix ``window_chunks`` chunks rather than the whole
dataset (``convert`` shuffles the items before chunking for that reason), and each node's cache
must hold a window (plus what LitData prefetches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusionlab.data.archive import CorruptFile
from diffusionlab.data.convert import LITDATA_KEY
from diffusionlab.data.image_archive import decode_image
from diffusionlab.data.lazy import LazyDataset, uint8_to_float
from diffusionlab.data.sampler import BatchLayout, StepSampler, sample_seed
from diffusionlab.errors import ConfigError

# streams of the chunk-aware order (data/sampler.py holds 0-3, latent_archive.py 4)
CHUNK_ORDER_STREAM = 5
WINDOW_STREAM = 6


def window_permutation(
    chunk_sizes: np.ndarray, window_chunks: int, seed: int, epoch: int
) -> np.ndarray:
    """The sample order of ``epoch``: chunks in a seeded order, windows of ``window_chunks``
    consecutive chunks shuffled internally (int64 [N])."""
    starts = np.concatenate([[0], np.cumsum(chunk_sizes)])
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, CHUNK_ORDER_STREAM))
    order = torch.randperm(len(chunk_sizes), generator=g).numpy()
    epoch_seed = sample_seed(seed, epoch, WINDOW_STREAM)
    parts = []
    for k, first in enumerate(range(0, len(order), window_chunks)):
        members = np.concatenate(
            [np.arange(starts[c], starts[c + 1]) for c in order[first : first + window_chunks]]
        )
        gw = torch.Generator().manual_seed(sample_seed(epoch_seed, k, WINDOW_STREAM))
        parts.append(members[torch.randperm(len(members), generator=gw).numpy()])
    return np.concatenate(parts)


class ChunkedStepSampler(StepSampler):
    """``StepSampler`` over a chunk-aware epoch order, a step's samples sorted by chunk before
    they are split over ranks and micro-batches."""

    def __init__(
        self,
        chunk_sizes: np.ndarray,
        window_chunks: int,
        layout: BatchLayout,
        rank: int = 0,
        seed: int = 0,
        start: int = 0,
    ) -> None:
        self.chunk_sizes = np.asarray(chunk_sizes, dtype=np.int64)
        self.chunk_starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)])
        self.window_chunks = int(window_chunks)
        super().__init__(int(self.chunk_sizes.sum()), layout, rank, seed, start)
        self._step = -1
        self._step_keys: list[tuple[int, int]] = []

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = window_permutation(self.chunk_sizes, self.window_chunks, self.seed, epoch)
            self._epoch = epoch
        return self._perm

    def step_keys(self, step: int) -> list[tuple[int, int]]:
        """``(index, position)`` of the whole global batch of ``step`` (after ``start``), sorted
        by (chunk, position)."""
        if step != self._step:
            first = self.start + step * self.layout.global_batch
            positions = np.arange(first, first + self.layout.global_batch, dtype=np.int64)
            epochs, offsets = np.divmod(positions, self.num_samples)
            indices = np.empty_like(positions)
            for epoch in np.unique(epochs).tolist():
                mask = epochs == epoch
                indices[mask] = self.permutation(epoch)[offsets[mask]]
            chunks = np.searchsorted(self.chunk_starts, indices, side="right") - 1
            order = np.lexsort((positions, chunks))
            self._step = step
            self._step_keys = list(
                zip(indices[order].tolist(), positions[order].tolist(), strict=True)
            )
        return self._step_keys

    def micro_batch(self, k: int) -> list[tuple[int, int]]:
        lay = self.layout
        step, j = divmod(k, lay.accumulation)
        first = self.rank * lay.per_device + j * lay.micro_batch
        return self.step_keys(step)[first : first + lay.micro_batch]


class StreamingImages(LazyDataset):
    """Images (PNG bytes) and labels of a LitData dataset, read by index.

    ``path``: the folder or URL ``convert format=litdata`` wrote (uploaded as it is);
    ``cache_dir`` / ``max_cache_size``: LitData's node-local chunk cache; ``window_chunks``:
    how many chunks an epoch's windows mix (part of the order: changing it changes the run)."""

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        window_chunks: int = 16,
        skip_corrupt: bool = False,
    ) -> None:
        if window_chunks < 1:
            raise ConfigError(f"dataset.window_chunks={window_chunks} must be >= 1")
        self.path, self.cache_dir, self.max_cache_size = str(path), cache_dir, max_cache_size
        self.window_chunks = int(window_chunks)
        self.skip_corrupt = skip_corrupt
        self._stream = None
        self._pid = -1
        if "://" not in self.path and not (Path(self.path) / "index.json").is_file():
            raise ConfigError(
                f"dataset.path={self.path!r} holds no LitData index.json (write one with "
                "dl-dataset convert source=... dest=<folder> format=litdata)"
            )
        index = self._index()
        self.chunk_sizes = np.asarray([c["chunk_size"] for c in index["chunks"]], dtype=np.int64)
        self.chunk_ends = np.cumsum(self.chunk_sizes)
        info = index.get(LITDATA_KEY) or {}
        first = decode_image(bytes(self._item(0)["image"]))
        self._stream, self._pid = None, -1  # workers open their own
        self.mode = "L" if first.shape[2] == 1 else "RGB"
        h, w, c = first.shape
        for key, want, have in (("channels", channels, c), ("resolution", resolution, h)):
            if want is not None and int(want) != have:
                raise ConfigError(
                    f"dataset.{key}={want} but the images of dataset.path={self.path!r} are "
                    f"{h}x{w}x{c}; the model is built for dataset.{key}: leave it unset (null)"
                )
        self.shape = (c, h, w)
        self.label_array = None  # labels travel with the samples
        stored = int(info.get("num_classes", 0))
        self.num_classes = stored if num_classes is None else int(num_classes)
        if self.num_classes and not stored and num_classes is not None:
            raise ConfigError(f"dataset.num_classes={num_classes} but {self.path!r} has no labels")

    def _open(self):  # noqa: ANN202
        from litdata import StreamingDataset

        kw = {"max_cache_size": self.max_cache_size}
        if self.cache_dir:
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            kw["cache_dir"] = self.cache_dir
        return StreamingDataset(self.path, **kw)

    def _index(self) -> dict:
        """LitData's index.json (downloaded into the cache for a remote ``path``)."""
        stream = self._open()
        len(stream)  # resolves the cache folder and fetches the index
        return json.loads((Path(stream.input_dir.path) / "index.json").read_text())

    def _item(self, i: int) -> dict:
        from litdata.streaming.sampler import ChunkedIndex

        if self._pid != os.getpid():  # each worker process opens its own reader
            self._stream, self._pid = self._open(), os.getpid()
        chunk = int(np.searchsorted(self.chunk_ends, i, side="right"))
        return self._stream[ChunkedIndex(index=i, chunk_index=chunk)]

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _stream=None, _pid=-1)

    def __len__(self) -> int:
        return int(self.chunk_sizes.sum())

    def step_sampler(
        self, layout: BatchLayout, rank: int, seed: int, start: int
    ) -> ChunkedStepSampler:
        return ChunkedStepSampler(self.chunk_sizes, self.window_chunks, layout, rank, seed, start)

    def load(self, i: int) -> tuple[Tensor, int]:
        item = self._item(i)
        try:
            arr = decode_image(bytes(item["image"]), self.mode)
        except CorruptFile as e:
            raise CorruptFile(f"sample {i} of {self.path!r} {e}") from None
        if arr.shape != (self.shape[1], self.shape[2], self.shape[0]):
            raise ConfigError(f"sample {i} of {self.path!r} is {arr.shape}, not {self.shape}")
        label = int(item["label"]) if self.num_classes else -1
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), label

    def finish_batch(self, x: Tensor) -> Tensor:
        return uint8_to_float(x)
