"""Every command in docs/data.md runs as written, small: fake photos, ImageNet and CIFAR-10
tarball, a tiny random diffusers VAE; sizes, models and devices scaled down by the substitutions
below (the only changes), each app given a few steps."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from diffusionlab.config import CONF_DIR

from .helpers import ROOT

DOC = ROOT / "docs" / "data.md"
# GPU and full-size choices -> their CPU-sized twins
SUBS = [
    ("resolution=512", "resolution=16"),
    ("resolution=64", "resolution=16"),
    ("model=unet_ddpmpp", "model=unet_tiny"),
    ("model=unet_edm2", "model=unet_edm2_tiny"),
    ("trainer=ddp trainer.devices=8", "trainer=ddp_cpu"),
    ("device=cuda", "device=cpu"),
]
TINY = {
    "dl-dataset": "progress=false num_workers=1",
    "python train.py": "data.batch_size=8 trainer.max_steps=2 logger=csv sampler.nfe=3 "
    "~callbacks.rich_progress_bar callbacks.sample_grid.num_samples=4 trainer.enable_model_summary=false",
    "python sample.py": "sampler.nfe=3",
}


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_doc_commands_compose():
    """Fast check of the doc against the configs: every key a command sets exists."""
    tool = set(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "dataset_tool.yaml")))
    for line in commands():
        words = shlex.split(line)
        if words[0] == "dl-dataset":
            assert words[1] in ("convert", "encode")
            assert all(w.split("=")[0] in tool for w in words[2:]), line
        elif words[:2] == ["python", "train.py"]:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name="train", overrides=words[2:])
            assert cfg.dataset._target_.startswith("diffusionlab.data."), line


def _fixtures(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 40), (24, 24)] * 4):  # photos/: mixed sizes
        (root / "photos").mkdir(exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(root / "photos" / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    for c in ("n01440764", "n01443537"):  # imagenet/train/<synset>/*.JPEG
        (root / "imagenet" / "train" / c).mkdir(parents=True)
        for i in range(10):
            img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            img.save(root / "imagenet" / "train" / c / f"{c}_{i}.JPEG")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from nvlabs_format import write_cifar_tarball

    (root / "downloads").mkdir()
    write_cifar_tarball(root / "downloads" / "cifar-10-python.tar.gz", per_batch=2)
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(root / "sd-vae-ft-mse")


@pytest.mark.slow
def test_every_data_doc_command_runs(tmp_path):
    _fixtures(tmp_path)
    lines = []
    for line in commands():
        for big, small in SUBS:
            line = line.replace(big, small)
        app = next((a for a in TINY if line.startswith(a)), None)
        if app is not None:
            line += f" {TINY[app]}"
            if app.startswith("python"):
                line += " paths.log_dir=logs paths.cache_dir=cache"
        if line.startswith("python "):
            line = line.replace("python ", f"{sys.executable} ", 1)
        line = line.replace("dl-dataset", f"{sys.executable} -m diffusionlab.cli.dataset", 1)
        lines.append(line)
    assert sum("train.py" in line for line in lines) == 4
    for script in ("train.py", "sample.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(lines) + "\n"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    from diffusionlab.data.image_archive import ImageArchive

    img64 = ImageArchive(str(tmp_path / "datasets" / "img64.zip"))
    assert img64.shape == (3, 16, 16) and img64.num_classes == 2 and len(img64) == 20
    assert ImageArchive(str(tmp_path / "datasets" / "cifar10-32x32.zip")).num_classes == 10
    assert (tmp_path / "datasets" / "img64-litdata" / "index.json").is_file()
    grid = next((tmp_path / "logs" / "sample").rglob("grid.png"))
    assert len(list(grid.parent.glob("0*.png"))) == 16
    assert Image.open(next(grid.parent.glob("0*.png"))).size == (16, 16)  # decoded images
