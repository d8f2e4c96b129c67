"""The torch-fidelity generator wrapper: per-index seeds, uint8 output, torch-fidelity's own loop
(with the numpy-2 np.int workaround), and the InceptionV3 weights message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import INCEPTION, create_extractor
from diffusionlab.evaluation.features import generated_features
from diffusionlab.evaluation.metrics import calculate_metrics, numpy_int_compat
from diffusionlab.evaluation.protocol import evaluate_generator, seed_ranges, summarize


def test_images_do_not_depend_on_batching(generator):
    seeds = [7, 3, 11, 5, 2]
    together = generator.generate(seeds)
    alone = torch.cat([generator.generate([s]) for s in seeds])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])
    noise, labels, _ = generator.seeded_inputs(seeds)
    assert torch.equal(labels, generator.seeded_inputs(seeds[::-1])[1].flip(0))


def test_forward_emits_uint8_rgb(generator):
    z = torch.randn(4, generator.z_size)
    out = generator(z, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1])


def test_generated_features_do_not_depend_on_batch_size(generator, extractor):
    a = generated_features(generator, extractor, range(10), batch_size=3)
    b = generated_features(generator, extractor, range(10), batch_size=10)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


class _Uint8(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = ((images * 127.5 + 128).clamp(0, 255).to(torch.uint8)).expand(-1, 3, -1, -1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_torch_fidelity_calculate_metrics_on_a_conditional_generator(generator, domain, mnist):
    name, path, _ = domain
    test = mnist.images[split_indices(len(mnist), "test")][:200]
    kwargs = dict(
        input1=generator,
        input1_model_num_samples=40,
        input2=_Uint8(test),
        fid=True,
        feature_extractor=name,
        feature_extractor_weights_path=str(path),
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        batch_size=20,
    )
    create_extractor(name, path)  # registers the domain extractor with torch-fidelity
    assert "int" not in np.__dict__
    with pytest.raises(AttributeError, match="int"):
        import torch_fidelity

        torch_fidelity.calculate_metrics(**kwargs)  # torch-fidelity 0.4.0 uses np.int
    out = calculate_metrics(**kwargs)
    assert np.isfinite(out["frechet_inception_distance"]) and out["frechet_inception_distance"] > 0
    assert "int" not in np.__dict__  # the patch is undone
    with numpy_int_compat():
        assert np.int is int


def test_missing_inception_weights_name_the_url_and_the_place(tmp_path):
    target = tmp_path / "inception.pth"
    with pytest.raises(ConfigError) as e:
        create_extractor(INCEPTION, target)
    assert URL_INCEPTION_V3 in str(e.value) and str(target) in str(e.value)
    assert "eval.inception_weights" in str(e.value)
    with pytest.raises(ConfigError, match=URL_INCEPTION_V3):
        create_extractor(INCEPTION, None)


def test_min_and_mean_over_seed_ranges(generator, extractor, reference, layers):
    ranges = seed_ranges(30, repeats=2)
    assert [list(r)[:2] for r in ranges] == [[0, 1], [30, 31]]
    out = evaluate_generator(generator, extractor, reference, layers, ranges, metrics=("fid",))
    assert out["fid_min"] <= out["fid_mean"] <= out["fid_max"]
    assert out["fid_min"] < out["fid_max"]
    assert summarize([{"fid": 2.0}]) == {"fid": 2.0}
