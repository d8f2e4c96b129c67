"""From a checkpoint file to a trained model: the one loader every app uses, the autoguidance
guide, and the config of the training run that wrote it (its dataset)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from diffusionlab.distributed import launch_of, local_cuda_index
from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.interop import is_pretrained, load_pretrained, pretrained_run_config
from diffusionlab.training.checkpoint_io import read_checkpoint
from diffusionlab.training.module import DiffusionModule


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` (or ``auto``) is this process's GPU,
    ``cuda:LOCAL_RANK``, when torchrun, srun or submitit started several processes."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    launch = launch_of()
    if device.index is None:
        return torch.device("cuda", local_cuda_index(launch))
    if launch.distributed:
        raise ConfigError(
            f"device={name}: with {launch.world_size} processes each takes its own GPU "
            "(cuda:LOCAL_RANK); use device=cuda or device=auto"
        )
    return device


def load_module(ckpt: str | None, device: torch.device) -> DiffusionModule:
    """The ``DiffusionModule`` stored in ``ckpt`` (eval mode, on ``device``), read with
    ``weights_only=True``; a file that does not hold the model its hparams describe is refused.
    Every app and :func:`load_guide` load models here and nowhere else."""
    if not ckpt:
        raise ConfigError("ckpt=... is required (a Lightning checkpoint written by train.py)")
    if is_pretrained(ckpt):  # an NVlabs pickle or a dl-export folder (diffusionlab.interop)
        return load_pretrained(ckpt, device)
    state = read_checkpoint(ckpt, "ckpt", map_location=device)
    try:
        module = DiffusionModule(**state["hyper_parameters"])
        module.on_load_checkpoint(state)
        module.load_state_dict(state["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError, InstantiationException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"ckpt={ckpt!r}: its weights do not fit the model its hyperparameters describe ({first})"
        ) from None
    return module.eval().to(device)


def load_guide(guide_ckpt: str | None, module: DiffusionModule) -> DiffusionModule | None:
    """The autoguidance guide of ``guide_ckpt`` (None when unset), on ``module``'s device; it must
    generate the same data shape with the same label dimension as ``module``, or be unconditional
    (EDM2's guidance by a separate unconditional model)."""
    if not guide_ckpt:
        return None
    guide = load_module(guide_ckpt, module.device)
    for name in ("data_shape", "label_dim"):
        if name == "label_dim" and guide.label_dim == 0:
            continue
        if getattr(guide, name) != getattr(module, name):
            raise ConfigError(
                f"guide_ckpt={guide_ckpt!r} has {name}={getattr(guide, name)} but ckpt has "
                f"{getattr(module, name)}: the guide must model the same data and labels"
            )
    return guide


def run_config(ckpt: str) -> DictConfig | None:
    """The resolved Hydra config of the training run (``<run>/.hydra/config.yaml``), if present."""
    if is_pretrained(ckpt):  # what an exported folder records of its run (its dataset)
        return pretrained_run_config(ckpt)
    for parent in Path(ckpt).resolve().parents[:3]:
        path = parent / ".hydra" / "config.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    return None


def dataset_config(dataset: DictConfig | None, ckpt: str | None, paths: DictConfig) -> DictConfig:
    """``dataset`` when given, else the dataset the checkpoint's training run used (a latent
    run's ``dataset.source``: its samples are decoded to images), with ``paths`` for its
    interpolations."""
    if dataset is not None:
        return dataset
    run = run_config(ckpt) if ckpt else None
    if run is None or "dataset" not in run:
        raise ConfigError("no reference dataset: pass dataset=<name> (e.g. dataset=mnist16)")
    merged = OmegaConf.create({"paths": OmegaConf.to_container(paths), "dataset": run.dataset})
    return merged.dataset.source if "source" in merged.dataset else merged.dataset
