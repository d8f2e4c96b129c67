"""sample.py with sampler.noise=per_seed|batched on a class-conditional checkpoint: both kinds give
each seed the same image in any batch; they are different numbers, so different images."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("cond")
    train(compose_train([*fast_overrides(tmp), "label_dim=10"], tmp / "run"))
    return str(next((tmp / "run").rglob("last.ckpt")))


def _samples(ckpt: str, out, noise: str, batch_size: int) -> np.ndarray:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "sample",
            [
                f"ckpt={ckpt}",
                "sampler=euler_ancestral",  # draws noise at every step
                "sampler.nfe=4",
                f"sampler.noise={noise}",
                "seeds=0-5",
                f"batch_size={batch_size}",
                "png=false",
                "npz=true",
                "device=cpu",
                "wandb.mode=disabled",
                f"outdir={out}",
                f"paths.output_dir={out}",
            ],
        )
    data = np.load(sample(cfg) / "samples.npz")
    return data["samples"], data["labels"]


def test_batched_noise_is_batch_independent_and_not_per_seed(cond_ckpt, tmp_path):
    batched, labels = _samples(cond_ckpt, tmp_path / "b6", "batched", 6)
    split, split_labels = _samples(cond_ckpt, tmp_path / "b2", "batched", 2)
    assert np.array_equal(batched, split) and np.array_equal(labels, split_labels)
    per_seed, seed_labels = _samples(cond_ckpt, tmp_path / "p6", "per_seed", 6)
    assert np.array_equal(per_seed, _samples(cond_ckpt, tmp_path / "p4", "per_seed", 4)[0])
    assert not np.array_equal(batched, per_seed)
    assert set(labels.tolist()) <= set(range(10)) and set(seed_labels.tolist()) <= set(range(10))
