"""train.py on the lazy datasets: a dataset zip with DataLoader workers resumes bitwise; a latent
zip trains a model whose checkpoint decodes its samples to images through the same VAE."""

import numpy as np
import torch

from diffusionlab.cli.train import train
from diffusionlab.data.convert import convert
from diffusionlab.sampling.generator import generate
from diffusionlab.training.module import DiffusionModule

from .helpers import compose_train, fast_overrides


def _zip(tmp_path, n=32, size=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = tmp_path / "src" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    convert(str(tmp_path / "src"), str(tmp_path / "d.zip"), progress=False)
    return tmp_path / "d.zip"


def _overrides(tmp_path, path, steps, extra=()):
    return [
        *fast_overrides(tmp_path / "logs"),
        "dataset=zip",
        f"dataset.path={path}",
        "label_dim=${dataset.num_classes}",
        "data.num_workers=1",
        "data.hflip=true",
        f"trainer.max_steps={steps}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "~callbacks.perf",
        *extra,
    ]


def test_zip_dataset_trains_with_workers_and_resumes_bitwise(tmp_path):
    path = _zip(tmp_path)
    cfg = compose_train(_overrides(tmp_path, path, 4), tmp_path / "full")
    assert cfg.dataset.resolution is None  # from the files
    train(cfg)
    assert (cfg.dataset.resolution, cfg.dataset.channels, cfg.dataset.num_classes) == (8, 3, 3)
    step2 = tmp_path / "full" / "checkpoints" / "step_000002.ckpt"
    resume = [f"resume_ckpt={step2}"]
    train(compose_train(_overrides(tmp_path, path, 4, resume), tmp_path / "resumed"))
    full, resumed = (
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)
        for d in ("full", "resumed")
    )
    assert full["global_step"] == resumed["global_step"] == 4
    assert (
        full["DiffusionDataModule"]
        == resumed["DiffusionDataModule"]
        == {
            "position": 64,
            "step": 4,
        }
    )
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_latent_zip_trains_and_its_checkpoint_decodes_images(tmp_path):
    from diffusers import AutoencoderKL as DAE

    from diffusionlab.data.encode import encode

    torch.manual_seed(0)
    DAE(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")
    encode(str(_zip(tmp_path, size=16)), str(tmp_path / "lat.zip"), str(tmp_path / "vae"),
           progress=False)  # fmt: skip
    overrides = [
        *fast_overrides(tmp_path / "logs"),
        "dataset=latents",
        f"dataset.path={tmp_path / 'lat.zip'}",
        f"dataset.vae={tmp_path / 'vae'}",
        "trainer.max_steps=2",
        "model.attn_resolutions=[]",
    ]
    train(compose_train(overrides, tmp_path / "run"))
    module = DiffusionModule.load_from_checkpoint(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert module.data_shape == (4, 8, 8) and module.decoder.kind == "diffusers"
    images = generate(module, [0, 1], sampler={"name": "euler", "nfe": 2})
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert (tmp_path / "run" / "samples").is_dir()
