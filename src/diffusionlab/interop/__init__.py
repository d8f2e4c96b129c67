"""Models in and out of diffusionlab: NVlabs/edm and edm2 network pickles (read without running
their code) and self-contained exported folders, accepted wherever a checkpoint is.

``is_pretrained(path)`` says whether a ``ckpt=`` value is one of them (a ``.pkl`` file, or an
exported folder / its ``model.safetensors``); ``read_pretrained`` gives the model without
Lightning; ``load_pretrained`` gives the ``DiffusionModule`` the apps use.
"""

from __future__ import annotations

from pathlib import Path

from diffusionlab.interop.export import export_dir, is_export, read_export, read_export_info
from diffusionlab.interop.model import Pretrained, build_denoiser
from diffusionlab.interop.nvlabs import read_nvlabs

PICKLE_SUFFIXES = (".pkl", ".pickle")

__all__ = ["Pretrained", "build_denoiser", "is_pretrained", "load_pretrained", "read_pretrained"]


def is_pretrained(path: object) -> bool:
    """A ``ckpt=`` value this package reads: an NVlabs pickle or an exported folder."""
    if not isinstance(path, str | Path) or not str(path):
        return False
    p = Path(path).expanduser()
    return p.suffix.lower() in PICKLE_SUFFIXES or is_export(p)


def read_pretrained(path: str | Path, key: str = "ckpt") -> Pretrained:
    """The model at ``path`` (NVlabs pickle or exported folder), without Lightning."""
    if Path(path).expanduser().suffix.lower() in PICKLE_SUFFIXES:
        return read_nvlabs(path, key)
    return read_export(path, key)


def model_dir(path: str | Path) -> Path:
    """The folder beside which a model's artifacts (VAE, grids) are looked for."""
    p = Path(path).expanduser()
    return export_dir(p) if is_export(p) else p.parent


def load_pretrained(path: str | Path, device: object = "cpu", key: str = "ckpt"):
    """The ``DiffusionModule`` of an NVlabs pickle or exported folder (eval mode, on ``device``):
    the network, EMA and every EMA profile hold the model's weights; ``sample_dtype`` (float64 for
    EDM pickles, as EDM's generate.py) and ``pretrained_info`` ride on it."""
    from diffusionlab.interop.module import to_module

    return to_module(read_pretrained(path, key), device, model_dir(path))


def pretrained_run_config(path: str | Path):
    """What a model records of the run that trained it, as a run config (``dataset`` only), or
    None: an exported folder of a train.py run records its dataset config; a pickle, nothing we
    can instantiate."""
    from omegaconf import OmegaConf

    if not is_export(path):
        return None
    dataset = read_export_info(path).get("dataset")
    return OmegaConf.create({"dataset": dataset}) if dataset and "_target_" in dataset else None
