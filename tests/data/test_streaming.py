"""dataset=streaming: the chunk-aware order keeps the data stream's guarantees (a step's samples
independent of the world size, exact resume, each sample once per epoch across ranks) while a
rank reads from few chunks at a time."""

import numpy as np
import pytest
import torch
from nvlabs_format import random_images, write_dataset

from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.convert import convert
from diffusionlab.data.sampler import BatchLayout
from diffusionlab.data.streaming import ChunkedStepSampler, StreamingImages, window_permutation
from diffusionlab.errors import ConfigError

SIZES = np.array([10, 10, 10, 10, 10, 10, 7, 10])  # 77 samples, the last-but-one chunk short


def _chunks(sampler: ChunkedStepSampler, keys) -> set[int]:
    return {int(np.searchsorted(sampler.chunk_starts, i, side="right")) - 1 for i, _ in keys}


def test_window_permutation_is_an_epoch_of_windows():
    perm = window_permutation(SIZES, 3, seed=1, epoch=0)
    assert sorted(perm.tolist()) == list(range(77))
    starts = np.concatenate([[0], np.cumsum(SIZES)])
    chunk = np.searchsorted(starts, perm, side="right") - 1
    # the first window is 3 whole chunks, shuffled together
    window = list(dict.fromkeys(chunk.tolist()))[:3]
    n0 = int(SIZES[window].sum())
    members = sorted(i for c in window for i in range(starts[c], starts[c + 1]))
    assert sorted(perm[:n0].tolist()) == members and perm[:n0].tolist() != members
    assert not np.array_equal(perm, window_permutation(SIZES, 3, seed=1, epoch=1))
    assert np.array_equal(perm, window_permutation(SIZES, 3, seed=1, epoch=0))


def test_a_step_is_the_same_samples_for_any_world_size_and_split():
    whole = ChunkedStepSampler(SIZES, 4, BatchLayout.derive(16, 1), seed=3)
    for world, cap in ((2, None), (4, 2)):
        ranks = [
            ChunkedStepSampler(SIZES, 4, BatchLayout.derive(16, world, cap), rank=r, seed=3)
            for r in range(world)
        ]
        rounds = ranks[0].layout.accumulation
        for step in range(12):  # 192 positions: two epoch boundaries
            parts = [s.micro_batch(step * rounds + k) for s in ranks for k in range(rounds)]
            got = sorted(key for mb in parts for key in mb)
            assert got == sorted(whole.micro_batch(step))
            positions = sorted(p for _, p in got)
            assert positions == list(range(16 * step, 16 * step + 16))


def test_each_sample_once_per_epoch_and_ranks_read_few_chunks():
    world, window = 4, 8
    ranks = [
        ChunkedStepSampler(SIZES, window, BatchLayout.derive(28, world), rank=r, seed=0)
        for r in range(world)
    ]
    seen, touched = [], []
    for step in range(77 // 28):
        for s in ranks:
            keys = s.micro_batch(step)
            seen += [i for i, _ in keys]
            touched.append(len(_chunks(s, keys)))
    assert len(seen) == len(set(seen))  # no sample twice within the epoch, across ranks
    # sorted by chunk before the split: a rank reads ~window / world + 1 chunks, not all 8
    assert max(touched) <= window // world + 2 and np.mean(touched) < 4


def test_resume_starts_inside_the_epoch_where_it_stopped():
    lay = BatchLayout.derive(8, 2)
    full = ChunkedStepSampler(SIZES, 3, lay, rank=1, seed=2)
    resumed = ChunkedStepSampler(SIZES, 3, lay, rank=1, seed=2, start=5 * 8)
    assert [full.micro_batch(k) for k in range(5, 14)] == [resumed.micro_batch(k) for k in range(9)]


def test_streaming_dataset_through_the_datamodule(tmp_path):
    images = random_images(30, size=4)
    write_dataset(tmp_path / "src", images, list(range(30)))
    convert(str(tmp_path / "src"), str(tmp_path / "lit"), format="litdata", chunk_bytes="1kB",
            progress=False)  # fmt: skip
    make = lambda: StreamingImages(  # noqa: E731
        str(tmp_path / "lit"), window_chunks=2, cache_dir=str(tmp_path / "c")
    )
    ds = make()
    assert ds.shape == (3, 4, 4) and ds.num_classes == 30 and len(ds.chunk_sizes) > 4
    dm = DiffusionDataModule(make, batch_size=10, num_workers=1, seed=4)
    seen = []
    for rank in (0, 1):
        from torch.utils.data import DataLoader

        from diffusionlab.data.datamodule import Collate, _Stored
        from diffusionlab.data.sampler import PositionedDataset

        loader = DataLoader(PositionedDataset(_Stored(dm.dataset), 4), num_workers=1,
                            batch_sampler=dm.sampler(2, rank, 0), collate_fn=Collate())  # fmt: skip
        it = iter(loader)
        for _ in range(3):
            x, y, _ = dm.finish(next(it))
            assert x.dtype == torch.float32 and x.min() >= -1
            for xi, yi in zip(x, y.tolist(), strict=True):  # each image is its source image
                want = torch.from_numpy(images[yi]).permute(2, 0, 1).float() / 127.5 - 1
                assert torch.equal(xi, want)
            seen += y.tolist()
    assert sorted(seen) == list(range(30))
    with pytest.raises(ConfigError, match="holds no LitData index.json"):
        StreamingImages(str(tmp_path / "src"))
    with pytest.raises(ConfigError, match="dataset.resolution=8 but"):
        StreamingImages(str(tmp_path / "lit"), resolution=8, cache_dir=str(tmp_path / "c"))
