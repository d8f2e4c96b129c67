"""Tiny NVlabs-format pickles of each supported network, written from our networks' weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusionlab.networks import DhariwalUNet, EDM2UNet, SongUNet

from .nvlabs_writer import Persistent, easydict, precond, write_pickle

SMALL = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
NCSNPP = dict(
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    resample_filter=[1, 3, 3, 1],
)
# name: (precond class, network class, network kwargs, precond kwargs, label_dim, channels)
CONFIGS = {
    "edm_ddpmpp": ("EDMPrecond", SongUNet, dict(SMALL, augment_dim=9), {}, 10, 3),
    "vp_ddpmpp": ("VPPrecond", SongUNet, dict(SMALL), dict(beta_d=19.9, beta_min=0.1), 0, 3),
    "ve_ncsnpp": ("VEPrecond", SongUNet, dict(SMALL, **NCSNPP), dict(sigma_max=100), 0, 3),
    "edm_adm": ("EDMPrecond", DhariwalUNet, dict(SMALL), dict(sigma_data=0.5), 10, 3),
    "edm2": ("Precond", EDM2UNet, dict(SMALL, channels_per_head=16), {}, 10, 4),
}


@torch.no_grad()
def perturb(net: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move zero-initialised weights off zero so every path of the network matters."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def tiny_network(
    name: str,
    res: int = 8,
    seed: int = 0,
    channels: int | None = None,
    label_dim: int | None = None,
) -> torch.nn.Module:
    """Our network of config ``name`` with random (perturbed) weights."""
    _, cls, kw, _, labels, ch = CONFIGS[name]
    ch = channels or ch
    label_dim = labels if label_dim is None else label_dim
    torch.manual_seed(seed)
    extra = {"logvar_channels": 128} if cls is EDM2UNet else {"dropout": 0.0}
    return perturb(cls(res, ch, ch, label_dim=label_dim, **kw, **extra), seed + 1)


def write_tiny(
    name: str,
    folder: Path,
    res: int = 8,
    seed: int = 0,
    file: str | None = None,
    channels: int | None = None,
    label_dim: int | None = None,
):
    """Write the pickle of config ``name`` into ``folder``; returns (path, our network)."""
    kind, cls, kw, pre_kw, labels, ch = CONFIGS[name]
    ch = channels or ch
    label_dim = labels if label_dim is None else label_dim
    net = tiny_network(name, res, seed, ch, label_dim)
    init = dict(img_resolution=res, img_channels=ch, label_dim=label_dim, **pre_kw, **kw)
    if kind == "Precond":
        init.update(use_fp16=True, logvar_channels=128)
        top = precond(kind, net, init, "unet", lift=("logvar_fourier", "logvar_linear"))
        raw_std = np.float32([4.17, 4.62, 3.71, 3.28])
        encoder = Persistent(
            "StabilityVAEEncoder",
            {
                "vae_name": "stabilityai/sd-vae-ft-mse",
                "scale": np.float32(0.5) / raw_std,
                "bias": np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * (0.5 / raw_std),
                "batch_size": 8,
                "_vae": None,
                "_init_args": (),
                "_init_kwargs": {},
            },
        )
        data = easydict(
            ema=top, encoder=encoder, loss_fn=None, dataset_kwargs=easydict(path="img512-sd.zip")
        )
        file = file or f"edm2-img{res}-tiny-0002048-0.130.pkl"
    else:
        init.update(model_type=cls.__name__)
        data = {
            "ema": precond(kind, net, init),
            "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
            "augment_pipe": None,
            "dataset_kwargs": easydict(
                class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip"
            ),
        }
        file = file or f"{name}.pkl"
    return write_pickle(folder / file, data), net
