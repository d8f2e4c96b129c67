"""The endless step-indexed sample stream: sharding, accumulation, epochs, resume, per-sample seeds."""

import pytest
import torch

from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.sampler import (
    FLIP_STREAM,
    NOISE_STREAM,
    BatchLayout,
    PositionedDataset,
    StepSampler,
    sample_seed,
)
from diffusionlab.errors import ConfigError


def _take(sampler: StepSampler, n: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_layout_derives_per_device_batch_and_accumulation():
    lay = BatchLayout.derive(64, 4, 4)
    assert (lay.per_device, lay.micro_batch, lay.accumulation) == (16, 4, 4)
    assert BatchLayout.derive(64, 2).accumulation == 1
    assert BatchLayout.derive(8, 2, 16).micro_batch == 4  # a cap above the per-device batch
    with pytest.raises(ConfigError, match="data.batch_size=10"):
        BatchLayout.derive(10, 4)
    with pytest.raises(ConfigError, match="data.batch_per_device=3"):
        BatchLayout.derive(16, 2, 3)


def test_one_step_is_the_same_positions_however_split():
    """1 rank x 1 micro-batch, 2 ranks x 2 micro-batches: step s covers positions s*B .. s*B+B-1."""
    whole = StepSampler(10, BatchLayout.derive(8, 1), seed=3)
    split = [StepSampler(10, BatchLayout.derive(8, 2, 2), rank=r, seed=3) for r in (0, 1)]
    for step, batch in enumerate(_take(whole, 3)):
        assert [p for _, p in batch] == list(range(8 * step, 8 * step + 8))
        parts = [mb for s in split for mb in _take(s, 2 * (step + 1))[2 * step : 2 * step + 2]]
        assert [key for mb in parts for key in mb] == batch


def test_each_epoch_is_a_permutation_that_depends_on_seed_and_epoch():
    s = StepSampler(10, BatchLayout.derive(5, 1), seed=0)
    idx = [i for b in _take(s, 6) for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert idx[:10] != idx[10:20]  # reshuffled each epoch
    other = StepSampler(10, BatchLayout.derive(5, 1), seed=1)
    assert [i for b in _take(other, 2) for i, _ in b] != idx[:10]


def test_start_position_resumes_inside_an_epoch():
    lay = BatchLayout.derive(4, 1)
    full = _take(StepSampler(10, lay, seed=7), 5)
    assert _take(StepSampler(10, lay, seed=7, start=8), 3) == full[2:]


def test_sample_seeds_are_distinct_per_position_stream_and_seed():
    seeds = {sample_seed(0, p) for p in range(10_000)}
    assert len(seeds) == 10_000 and max(seeds) < 2**63
    assert sample_seed(0, 5, NOISE_STREAM) != sample_seed(0, 5, FLIP_STREAM)
    assert sample_seed(0, 5) != sample_seed(1, 5)


def test_flips_follow_the_sample_position():
    x = torch.arange(4.0).view(1, 1, 4).expand(1, 4, 4)
    ds = PositionedDataset([(x, 0)], seed=0, hflip=True)
    flipped = [bool(ds[(0, p)][0][0, 0, 0] == 3) for p in range(200)]
    assert 70 < sum(flipped) < 130  # about half
    assert flipped == [bool(ds[(0, p)][0][0, 0, 0] == 3) for p in range(200)]
    assert all(flipped[p] == bool(sample_seed(0, p, FLIP_STREAM) & 1) for p in range(200))


def test_datamodule_state_moves_the_start_position():
    dm = DiffusionDataModule(list(zip(torch.zeros(10, 1, 2, 2), range(10))), batch_size=4, seed=1)
    dm.load_state_dict({"position": 12, "step": 3})
    assert dm.position(5) == 12 + 2 * 4
    assert dm.state_dict() == {"position": 12, "step": 3}  # no trainer: where it was restored
