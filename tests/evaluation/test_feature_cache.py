"""Generated features kept per batch: a rerun computes only the batches that are missing and gets
the features of an uninterrupted run; other settings never share rows; a stop signal keeps what
was made."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from diffusionlab.evaluation.features import FeatureCache, generated_features
from diffusionlab.stopping import Stopped, stop_signals


class Counting:
    """The generator, counting the seeds it is asked to generate."""

    def __init__(self, generator, stop_after: int | None = None) -> None:
        self.generator, self.seeds, self.stop_after = generator, [], stop_after
        self.condition = generator.condition

    def generate(self, seeds, class_label=None):
        self.seeds += list(seeds)
        if self.stop_after is not None and len(self.seeds) >= self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.generator.generate(seeds, class_label)


def test_a_rerun_makes_only_the_missing_batches_and_equals_an_uninterrupted_run(
    generator, extractor, tmp_path
):
    seeds = range(100, 124)
    record = {"ckpt": "a", "sampler": {"name": "heun", "nfe": 9}}
    whole = generated_features(generator, extractor, seeds, batch_size=8)
    cache = FeatureCache(tmp_path, record)
    first = Counting(generator, stop_after=16)  # SIGTERM as the second batch starts sampling
    with stop_signals(), pytest.raises(Stopped, match=r"features of 8 of 24 samples kept in"):
        generated_features(first, extractor, seeds, batch_size=8, cache=cache)
    assert len(list(cache.dir.glob("*.pt"))) == 1 and (cache.dir / "record.json").is_file()
    again = Counting(generator)
    resumed = generated_features(again, extractor, seeds, batch_size=8, cache=cache)
    assert again.seeds == list(range(108, 124))  # only the batches that were missing
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    # more seeds later: the kept ones count, in any order of batches
    more = Counting(generator)
    wider = generated_features(more, extractor, range(96, 124), batch_size=8, cache=cache)
    assert more.seeds == [96, 97, 98, 99]
    for k in whole:
        assert torch.equal(wider[k][4:], whole[k])
    other = FeatureCache(tmp_path, {**record, "sampler": {"name": "heun", "nfe": 17}})
    assert other.dir != cache.dir and other.load(seeds) == ([], {})
