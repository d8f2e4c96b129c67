"""Text and image conditions as the model and its training step see them (``cond=text|image``;
class labels keep their own path through ``label_dim``). docs/conditioning.md.

:class:`ConditionSettings` is the checked ``cond`` config node stored in the checkpoint; it says
which inputs the network takes (``model_kwargs``) and turns a batch into them
(:func:`training_inputs`): captions through the text encoder, or the batch's own images
downsampled, with noise-conditioning augmentation (Ho et al. 2021, sec. 4.1), each sample's
condition dropped with probability ``dropout`` for classifier-free guidance. Every draw comes
from the sample's own streams of the batched generator (``diffusion/seeds.py``), so a step does
not depend on how its batch is split."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.seeds import (
    COND_AUG_LEVEL_STREAM,
    COND_AUG_NOISE_STREAM,
    COND_DROPOUT_STREAM,
)
from diffusionlab.errors import ConfigError
from diffusionlab.networks.text_encoders import TextEncoder

COND_KINDS = ("none", "class", "text", "image")
# the noise-augmentation level enters the network as these Fourier features (cond_vector)
AUG_FEATURES = 16


@dataclass(frozen=True)
class ConditionSettings:
    """A checked ``cond`` node of kind ``text`` or ``image``.

    text: ``encoder`` (``networks/text_encoders.py``), ``cross_attn_resolutions`` (where the
    network attends to the caption), ``prompts`` (drawn for training grids and evaluation).
    image: ``factor`` (the condition is the target downsampled by it, area averaging),
    ``aug_max`` (training noise-augmentation levels ~ U[0, aug_max]) and ``aug_sigma`` (the
    level used when sampling). ``dropout``: p_uncond of classifier-free guidance."""

    kind: str
    dropout: float = 0.0
    encoder: dict = field(default_factory=dict)
    cross_attn_resolutions: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    factor: int = 2
    aug_max: float = 0.0
    aug_sigma: float = 0.0

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | None, data_shape: Sequence[int]
    ) -> ConditionSettings | None:
        """The settings of a ``cond`` node; None for ``cond=none`` / ``class`` (``label_dim``)."""
        if cfg is None:
            return None
        kind = cfg.get("kind", "none")
        if kind not in COND_KINDS:
            raise ConfigError(f"cond.kind={kind!r} must be one of {COND_KINDS}")
        dropout = float(cfg.get("dropout", 0.0))
        if not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"cond.dropout={dropout} must be in [0, 1]")
        if kind in ("none", "class"):
            return None
        if len(data_shape) != 3:
            raise ConfigError(f"cond={kind} needs image data, not data of shape {list(data_shape)}")
        if kind == "text":
            encoder = dict(cfg.get("encoder") or {})
            resolutions = tuple(int(r) for r in cfg.get("cross_attn_resolutions") or ())
            if not resolutions:
                raise ConfigError(
                    "cond.cross_attn_resolutions is empty: name the feature-map resolutions "
                    f"where the network attends to the text (e.g. [{data_shape[-1] // 2}])"
                )
            prompts = tuple(str(p) for p in cfg.get("prompts") or ())
            return cls(kind, dropout, encoder, resolutions, prompts)
        factor = int(cfg.get("factor", 2))
        if factor < 1 or data_shape[-1] % factor:
            raise ConfigError(
                f"cond.factor={factor} must divide the data resolution {data_shape[-1]}"
            )
        aug_max, aug_sigma = float(cfg.get("aug_max", 0.0)), float(cfg.get("aug_sigma", 0.0))
        if aug_max < 0 or aug_sigma < 0:
            raise ConfigError(f"cond.aug_max={aug_max} and cond.aug_sigma={aug_sigma} must be >= 0")
        return cls(kind, dropout, factor=factor, aug_max=aug_max, aug_sigma=aug_sigma)

    @property
    def trainable_encoder(self) -> bool:
        return self.kind == "text" and self.encoder.get("kind", "trainable") == "trainable"

    def model_kwargs(self, data_shape: Sequence[int], encoder: TextEncoder | None) -> dict:
        """The network arguments this condition needs (``networks/context.py``)."""
        if self.kind == "text":
            return {
                "context_dim": encoder.context_dim,
                "vector_dim": encoder.vector_dim,
                "cross_attn_resolutions": list(self.cross_attn_resolutions),
            }
        return {"cond_channels": int(data_shape[0]), "vector_dim": AUG_FEATURES}

    def lowres(self, images: Tensor) -> Tensor:
        """The conditioning input of an image: area-downsampled by ``factor``."""
        return F.avg_pool2d(images, self.factor) if self.factor > 1 else images


def aug_features(sigma: Tensor) -> Tensor:
    """``[B] -> [B, 16]``: cos/sin features of the augmentation level at frequencies 2^k / 4."""
    freqs = 2.0 ** torch.arange(AUG_FEATURES // 2, device=sigma.device, dtype=torch.float32) / 4
    arg = 2 * math.pi * sigma.float()[:, None] * freqs
    return torch.cat([arg.cos(), arg.sin()], dim=1)


def augment_lowres(low: Tensor, sigma: Tensor, noise: Tensor) -> dict[str, Tensor]:
    """Noise-conditioning augmentation (Ho et al. 2021, sec. 4.1) in sigma-space:
    ``(low + sigma n) / sqrt(1 + sigma^2)`` (the VP forward process at that level) and the level
    for the network."""
    s = sigma.view(-1, *([1] * (low.ndim - 1))).to(low.dtype)
    return {
        "cond_image": (low + s * noise.to(low.dtype)) / torch.sqrt(1 + s * s),
        "cond_vector": aug_features(sigma),
    }


def drop_inputs(inputs: dict[str, Tensor], p: float, generator: BatchedGenerator) -> dict:
    """Each sample's condition replaced by the unconditional input (zeros, an empty context)
    with probability ``p``, from its own stream (classifier-free guidance, Ho & Salimans 2022)."""
    if p == 0:
        return inputs
    keep = generator.uniform((1,), COND_DROPOUT_STREAM)[:, 0] >= p
    out = {}
    for k, v in inputs.items():
        m = keep.to(v.device).view(-1, *([1] * (v.ndim - 1)))
        out[k] = v & m if v.dtype == torch.bool else v * m.to(v.dtype)
    return out


def null_inputs(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The unconditional input of a batch of condition inputs: what dropout trains."""
    return {k: torch.zeros_like(v) for k, v in inputs.items()}


def training_inputs(
    settings: ConditionSettings,
    encoder: TextEncoder | None,
    x0: Tensor,
    captions: Sequence[str] | None,
    generator: BatchedGenerator,
) -> dict[str, Tensor]:
    """The network's condition inputs for a training batch (``x0`` after augmentation)."""
    if settings.kind == "text":
        if captions is None:
            raise ConfigError(
                "cond=text: the training batches carry no captions; use a captioned dataset "
                "(dataset=text_mnist, or dataset.captions=true with sidecar .txt files)"
            )
        inputs = encoder.encode(list(captions), x0.device)
    else:
        low = settings.lowres(x0.float())
        level = settings.aug_max * generator.uniform((1,), COND_AUG_LEVEL_STREAM)[:, 0]
        noise = generator.normal(low.shape[1:], COND_AUG_NOISE_STREAM)
        inputs = augment_lowres(low, level.to(x0.device), noise.to(x0.device))
    return drop_inputs(inputs, settings.dropout, generator)


def build_encoder(settings: ConditionSettings | None) -> TextEncoder | None:
    """The text encoder of a ``cond=text`` model (None for other kinds)."""
    if settings is None or settings.kind != "text":
        return None
    from diffusionlab.networks.text_encoders import build_text_encoder

    return build_text_encoder(settings.encoder)


def build_network(
    model: Mapping[str, Any],
    settings: ConditionSettings | None,
    data_shape: Sequence[int],
    encoder: TextEncoder | None,
    end_features: int = 0,
) -> torch.nn.Module:
    """The network of the ``model`` config with the inputs the condition needs, and
    ``end_features`` more vector inputs for a flow map's second time
    (``parameterizations.FlowMapParam``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    kwargs = {} if settings is None else settings.model_kwargs(data_shape, encoder)
    if end_features:
        kwargs["vector_dim"] = kwargs.get("vector_dim", 0) + end_features
    try:
        return instantiate(model, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError) and "cross_attn_resolutions" in str(cause):
            raise ConfigError(f"cond.{str(cause).split(': ', 1)[1]}") from None
        if not kwargs or "unexpected keyword argument" not in str(e):
            raise
        what = f"cond={settings.kind} inputs" if settings else "a second time (flow_map)"
        raise ConfigError(
            f"model={model.get('_target_')} does not take {what}; the networks that do: "
            f"SongUNet (unet_*), DhariwalUNet (unet_adm*), DiT, EDM2UNet{'' if settings else ', MLP'}"
        ) from None


def needs_captions(cond: Mapping[str, Any] | None, dataset: Any) -> bool:
    """True when the ``cond`` node reads captions (``cond=text``); the dataset must have them."""
    if not cond or cond.get("kind") != "text":
        return False
    if not getattr(dataset, "captioned", False):
        raise ConfigError(
            f"cond=text needs captions but dataset {type(dataset).__name__} has none: use "
            "dataset=text_mnist, or dataset=image_folder / zip with dataset.captions=true "
            "(a sidecar .txt per image or a dataset.json captions table)"
        )
    return True
