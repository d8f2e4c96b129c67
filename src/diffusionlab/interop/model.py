"""A model from outside a training run: its DiffusionModule hyperparameters, the weights of its
network and what it records about itself, and the denoiser built from them (no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor

from diffusionlab.diffusion.parameterizations import Denoiser
from diffusionlab.errors import CheckpointError


@dataclass
class Pretrained:
    """``hparams``: the ``DiffusionModule`` keyword arguments (model, schedule, parameterization,
    loss, optimizer, ema, data_shape, label_dim, sampler, latent) that rebuild it; ``net_state``:
    the network's weights (the sampling EMA); ``decoder_state``: a latent model's decoder weights;
    ``info``: what the source records (format, kimg, EMA length, VAE, training data, ...)."""

    hparams: dict[str, Any]
    net_state: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    decoder_state: dict[str, Tensor] | None = None

    @property
    def sample_dtype(self) -> torch.dtype:
        """The dtype the source's own generator samples in (EDM: float64, else float32)."""
        return getattr(torch, self.info.get("sample_dtype", "float32"))


def load_net_state(net: torch.nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Copy ``state`` into ``net`` (every tensor, no more, no less; cast to the net's dtype)."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {tuple(state[k].shape)}, the network's {tuple(own[k].shape)}")
        raise CheckpointError(f"{where}: the weights do not fit the network ({'; '.join(parts)})")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def build_denoiser(model: Pretrained, device: torch.device | str = "cpu") -> Denoiser:
    """The denoiser ``D(x; sigma)`` of ``model`` in eval mode (its network holds ``net_state``)."""
    h = model.hparams
    schedule = instantiate(h["schedule"])
    denoiser = Denoiser(
        instantiate(h["model"]), instantiate(h["parameterization"])(schedule=schedule)
    )
    load_net_state(denoiser.net, model.net_state, model.info.get("source", "model"))
    return denoiser.eval().requires_grad_(False).to(device)
