"""Latent diffusion end to end: dl-train-autoencoder, train.py experiment=ldm_mnist on its latents,
then sample.py and evaluate.py on the latent checkpoint, unchanged (images decoded inside)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.evaluate import evaluate
from diffusionlab.cli.sample import sample
from diffusionlab.cli.train import train
from diffusionlab.cli.train_autoencoder import run as train_autoencoder
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import generate
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.training.checkpoint_io import model_differences

from .helpers import compose_train, fast_overrides, run_app

# the 8x8 digits -> 4x4x4 latents (f = 2)
TINY_AE = ["dataset=digits", "autoencoder.channels=8", "autoencoder.channel_mult=[1,2]"]
DIGITS_LATENT = [
    "dataset.source._target_=diffusionlab.data.digits",
    "dataset.source.resolution=8",
    "dataset.resolution=4",
    "model.attn_resolutions=[]",
]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _ldm_overrides(tmp_path: Path, ae: Path) -> list[str]:
    fast = [o for o in fast_overrides(tmp_path) if not o.startswith("dataset=")]
    return [
        *fast,
        "experiment=ldm_mnist",
        f"dataset.autoencoder={ae}",
        *DIGITS_LATENT,
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def test_latent_model_trains_samples_and_evaluates(tmp_path):
    ae_cfg = _compose(
        "train_autoencoder", [*TINY_AE, "max_steps=3", f"paths.output_dir={tmp_path / 'ae'}"]
    )
    meta = train_autoencoder(ae_cfg)
    assert meta["latent_shape"] == [4, 4, 4] and meta["image_shape"] == [1, 8, 8]
    ae = tmp_path / "ae" / "autoencoder.ckpt"
    fid = [
        "+eval@callbacks.fid=fid_callback",
        "callbacks.fid.every_n_steps=3",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.extractor_steps=5",
    ]
    res = run_app("train.py", [*_ldm_overrides(tmp_path, ae), *fid])
    assert res.returncode == 0, res.stderr[-2000:]
    # the FID callback scored decoded samples against the source digits
    csv = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "eval/fid" in csv and next((tmp_path / "cache").rglob("*digits*"), None) is not None
    ckpt = next(tmp_path.rglob("last.ckpt"))
    module = load_module(str(ckpt), torch.device("cpu"))
    assert module.data_shape == (4, 4, 4) and module.hparams.latent["image_shape"] == [1, 8, 8]
    assert 0 < module.hparams.latent["scale_factor"] < 1e3
    assert any(k.startswith("decoder.") for k in module.state_dict())

    # sample.py: images, not latents, and exactly the module's decoded samples
    out = tmp_path / "samples"
    sample(
        _compose(
            "sample",
            [
                f"ckpt={ckpt}",
                "num_samples=3",
                "sampler.nfe=3",
                "npz=true",
                f"outdir={out}",
                f"paths.output_dir={tmp_path / 's'}",
            ],
        )
    )
    png = np.asarray(Image.open(out / "000002.png"))
    assert png.shape == (8, 8)
    x = generate(module, [0, 1, 2], sampler={"name": "heun", "nfe": 3})
    assert x.shape == (3, 1, 8, 8) and float(x.abs().max()) <= 1.0
    np.testing.assert_array_equal(png, to_uint8_rgb(x)[2, 0].numpy())

    # evaluate.py: decoded samples scored against the latent run's source images
    result = evaluate(
        _compose(
            "evaluate",
            [
                f"ckpt={ckpt}",
                "sampler.nfe=3",
                "eval.num_samples=8",
                "eval.extractor_steps=5",
                f"eval.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'e'}",
            ],
        )
    )
    assert result["dataset"] == "digits" and np.isfinite(result["metrics"]["fid"])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["dataset"] == "digits"


def test_missing_autoencoder_names_the_key(tmp_path):
    overrides = [o for o in _ldm_overrides(tmp_path, Path("x")) if "autoencoder" not in o]
    with pytest.raises(ConfigError, match=r"dataset.autoencoder: a value is required"):
        train(compose_train(overrides, tmp_path))
    missing = _ldm_overrides(tmp_path, tmp_path / "none.ckpt")
    with pytest.raises(
        ConfigError,
        match=r"dataset.autoencoder=.*none.ckpt' does not exist; "
        "train one with dl-train-autoencoder",
    ):
        train(compose_train(missing, tmp_path))


def test_resume_refuses_another_autoencoder():
    saved = {"data_shape": [4, 8, 8], "latent": {"scale_factor": 1.5, "autoencoder_sha256": "a"}}
    current = {"data_shape": [4, 8, 8], "latent": {"scale_factor": 1.5, "autoencoder_sha256": "b"}}
    assert model_differences(saved, current) == ["latent.autoencoder_sha256: 'a' -> 'b'"]
