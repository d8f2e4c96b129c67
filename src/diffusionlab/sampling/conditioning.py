"""What a model is conditioned on, wired once for every app and callback (docs/conditioning.md).

A condition kind says how a sample's condition is drawn from its own seed, how a requested value
is encoded for the network, what the unconditional input is (classifier-free guidance), and under
which network inputs the encoded condition goes. The kinds: :class:`ClassLabels` (integer
labels, one-hot), :class:`TextPrompts` (prompts, held as integer indices into the condition's
prompt table so they travel through every app like labels; encoded by the model's text
encoder) and :class:`LowResImages` (the images an image-conditioned model upsamples, noised to
the sampling augmentation level). :func:`condition_of` returns the kind a trained model takes.

An encoded condition is a tensor (class labels) or a dict of tensors (the network inputs of
``networks/context.py``), batch first."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.errors import ConfigError
from diffusionlab.training.conditions import ConditionSettings, augment_lowres, null_inputs

# a per-sample generator (sampler.noise: per_seed or batched)
SampleGenerator = StackedRandomGenerator | BatchedGenerator

# an encoded condition: class labels' one-hot, or the network inputs of a text / image condition
Encoded = Tensor | dict[str, Tensor]

# ``denoise(x, sigma, cond)``: a denoiser given an encoded condition (None: unconditional)
CondDenoise = Callable[[Tensor, Tensor, Encoded | None], Tensor]


class Condition(ABC):
    """One kind of condition. ``num_classes`` is torch-fidelity's class-conditional interface
    (0 for kinds that are not class labels). ``drawable``: a value can be drawn from a sample's
    seed (False: the value must be given, e.g. the image to upsample)."""

    kind: str = ""
    num_classes: int = 0
    drawable: bool = True

    @abstractmethod
    def draw(self, generator: SampleGenerator, device: torch.device) -> Tensor:
        """One value per sample, each from its own generator (after its noise, EDM generate.py)."""

    @abstractmethod
    def fixed(self, value: Any, n: int, device: torch.device) -> Tensor:
        """``value`` (a requested condition) for ``n`` samples."""

    @abstractmethod
    def encode(self, values: Tensor) -> Encoded:
        """Values -> what the network takes."""

    def encode_seeded(self, values: Tensor, generator: SampleGenerator | None) -> Encoded:
        """:meth:`encode` for samples with their own ``generator``: kinds that draw while
        encoding (the noise augmentation of an image condition) override it."""
        return self.encode(values)

    def null(self, encoded: Encoded) -> Encoded:
        """The unconditional input for a batch of encoded conditions (what label dropout trains)."""
        if isinstance(encoded, dict):
            return null_inputs(encoded)
        return torch.zeros_like(encoded)

    @abstractmethod
    def network_inputs(self, encoded: Encoded) -> dict[str, Tensor]:
        """The keyword arguments that carry the encoded condition to the denoiser."""

    def grid_values(self, n: int, device: torch.device, dataset: Any = None) -> Tensor:
        """The values of a training grid of ``n`` samples (``dataset``: the training data)."""
        raise NotImplementedError

    def same_encoding(self, other: Condition | None) -> bool:
        """True when ``other`` encodes values exactly as this one (a guide may reuse them)."""
        return other == self

    def describe(self, values: Tensor) -> list[str]:
        """A readable name per value (file names, npz, logs)."""
        return [str(int(v)) for v in values.reshape(-1).tolist()]


@dataclass(frozen=True)
class ClassLabels(Condition):
    """Integer class labels in ``[0, num_classes)``, one-hot for the network's ``class_labels``;
    the all-zeros one-hot is the unconditional model."""

    num_classes: int
    kind: str = "class"

    def draw(self, generator: SampleGenerator, device: torch.device) -> Tensor:
        return generator.randint(self.num_classes, (len(generator),)).to(device)

    def fixed(self, value: Any, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), int(value), device=device)

    def encode(self, values: Tensor) -> Tensor:
        return F.one_hot(values.long(), self.num_classes).float()

    def network_inputs(self, encoded: Tensor) -> dict[str, Tensor]:
        return {"class_labels": encoded}

    def grid_values(self, n: int, device: torch.device, dataset: Any = None) -> Tensor:
        return torch.arange(n, device=device) % self.num_classes


class TextPrompts(Condition):
    """Prompts for a text-conditioned model. Values are indices into :attr:`table`, which starts
    with the model's ``prompts`` (those :meth:`draw` picks from, one per seed) and grows by each
    prompt :meth:`fixed` is given; :meth:`encode` runs the model's text encoder on them."""

    kind = "text"

    def __init__(self, encoder: Any, prompts: Sequence[str] = ()) -> None:
        self.encoder = encoder
        self.prompts = [str(p) for p in prompts]
        self.table = list(self.prompts)

    def index(self, prompt: str) -> int:
        """The table index of ``prompt`` (added when new)."""
        prompt = str(prompt)
        if prompt not in self.table:
            self.table.append(prompt)
        return self.table.index(prompt)

    def draw(self, generator: SampleGenerator, device: torch.device) -> Tensor:
        """A prompt of :attr:`prompts` per sample (one integer draw per sample, as class labels;
        -1 when the model has none: a prompt must then be given)."""
        k = generator.randint(max(1, len(self.prompts)), (len(generator),)).to(device)
        return k if self.prompts else torch.full_like(k, -1)

    def fixed(self, value: Any, n: int, device: torch.device) -> Tensor:
        """``value``: one prompt for all ``n`` samples, or a list of ``n`` prompts."""
        if isinstance(value, str):
            return torch.full((n,), self.index(value), device=device)
        prompts = [str(v) for v in value]
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} samples")
        return torch.tensor([self.index(p) for p in prompts], device=device)

    def captions(self, values: Tensor) -> list[str]:
        idx = values.reshape(-1).tolist()
        if any(i < 0 or i >= len(self.table) for i in idx):
            raise ConfigError(
                "a text-conditioned model needs prompts: prompt=... or prompts_file=... (the "
                "model has no cond.prompts to draw from)"
            )
        return [self.table[i] for i in idx]

    def encode(self, values: Tensor) -> dict:
        return self.encoder.encode(self.captions(values), values.device)

    def network_inputs(self, encoded: dict[str, Tensor]) -> dict[str, Tensor]:
        return encoded

    def grid_values(self, n: int, device: torch.device, dataset: Any = None) -> Tensor:
        if not self.prompts:
            raise ConfigError(
                "cond.prompts is empty: the training grid of a text-conditioned model draws "
                'its prompts from it (e.g. cond.prompts=["a handwritten seven"])'
            )
        return torch.arange(n, device=device) % len(self.prompts)

    def same_encoding(self, other: Condition | None) -> bool:
        if not isinstance(other, TextPrompts):
            return False
        if other.encoder is self.encoder:
            return True
        mine, theirs = (getattr(e, "identity", None) for e in (self.encoder, other.encoder))
        return mine is not None and mine == theirs

    def describe(self, values: Tensor) -> list[str]:
        return self.captions(values)


class LowResImages(Condition):
    """The images an image-conditioned model (``cond=image``, super-resolution) is given:
    values are images ``[B, C, h, w]`` in [-1, 1]; encoding noises them to ``aug_sigma`` with
    each sample's own noise (noise-conditioning augmentation, Ho et al. 2021, sec. 4.1)."""

    kind = "image"
    drawable = False

    def __init__(self, settings: ConditionSettings, aug_sigma: float | None = None) -> None:
        self.settings = settings
        self.aug_sigma = settings.aug_sigma if aug_sigma is None else float(aug_sigma)
        if self.aug_sigma < 0:
            raise ConfigError(f"aug_sigma={self.aug_sigma} must be >= 0")

    def draw(self, generator: SampleGenerator, device: torch.device) -> Tensor:
        raise ConfigError(
            "an image-conditioned model (cond=image) generates from given images: "
            "dl-upsample ckpt=... inputs=<images> (or base_ckpt=... for a cascade)"
        )

    def fixed(self, value: Any, n: int, device: torch.device) -> Tensor:
        """``value``: one image ``[C, h, w]`` for all ``n`` samples, or ``n`` images."""
        images = torch.as_tensor(value, dtype=torch.float32, device=device)
        if images.ndim == 3:
            images = images.expand(n, *images.shape)
        if images.ndim != 4 or images.shape[0] != n:
            raise ValueError(f"image values must be [{n}, C, h, w], got {tuple(images.shape)}")
        return images

    def encode(self, values: Tensor) -> dict:
        """Without the samples' generator: only at ``aug_sigma=0`` (no noise to draw)."""
        return self.encode_seeded(values, None)

    def encode_seeded(self, values: Tensor, generator: SampleGenerator | None) -> dict:
        sigma = torch.full((values.shape[0],), self.aug_sigma, device=values.device)
        noise = torch.zeros_like(values)
        if self.aug_sigma > 0:
            if generator is None:
                raise ValueError("aug_sigma > 0 draws noise: pass the samples' generator")
            noise = generator.randn(values.shape).to(values.device)
        return augment_lowres(values.float(), sigma, noise)

    def network_inputs(self, encoded: dict[str, Tensor]) -> dict[str, Tensor]:
        return encoded

    def grid_values(self, n: int, device: torch.device, dataset: Any = None) -> Tensor:
        """The first ``n`` images of the training data, downsampled: what the grid upsamples."""
        if dataset is None:
            raise ConfigError("the training grid of an image-conditioned model needs its data")
        idx = torch.arange(n) % len(dataset)
        images = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
        return self.settings.lowres(images.float())

    def same_encoding(self, other: Condition | None) -> bool:
        return (
            isinstance(other, LowResImages)
            and other.settings.factor == self.settings.factor
            and other.aug_sigma == self.aug_sigma
        )

    def describe(self, values: Tensor) -> list[str]:
        return [f"image{i}" for i in range(values.shape[0])]


def condition_of(module: Any, use_ema: bool = True, denoiser: Any = None) -> Condition | None:
    """The condition a trained model takes, from its hyperparameters (None: unconditional).
    A text condition encodes with the text encoder that goes with ``denoiser`` (default: the
    module's EMA with ``use_ema``, else its trained weights)."""
    settings = getattr(module, "cond", None)
    if settings is None:
        return ClassLabels(module.label_dim) if module.label_dim else None
    if settings.kind == "text":
        if denoiser is None:
            denoiser = module.ema if use_ema else module.denoiser
        return TextPrompts(module.text_encoder(denoiser), settings.prompts)
    return LowResImages(settings)


def conditioned(net: Callable[..., Tensor], condition: Condition | None) -> CondDenoise:
    """``denoise(x, sigma, cond)`` over a denoiser module ``net(x, sigma, **inputs)``: the
    encoded condition goes in as the condition kind says; None runs the model unconditioned.
    Keywords (a flow map's ``sigma_end``) go to ``net`` as they are."""

    def denoise(x: Tensor, sigma: Tensor, cond: Encoded | None = None, **kw: Tensor) -> Tensor:
        if cond is None:
            return net(x, sigma, **kw)
        if condition is None:
            raise ValueError("a condition was given to an unconditional model")
        return net(x, sigma, **condition.network_inputs(cond), **kw)

    return denoise
