"""A diffusion sampler as a torch-fidelity generative model that emits uint8 RGB images."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.generative_model_base import GenerativeModelBase

from diffusionlab.diffusion.guidance import cfg_denoiser, label_cfg_denoiser
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.samplers import sample
from diffusionlab.evaluation.images import to_uint8_rgb

Denoise = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class DiffusionGenerator(GenerativeModelBase):
    """(denoiser, schedule, sampler, NFE) as a ``GenerativeModelBase``.

    ``sigmas`` is the fitted grid when ``discretization`` is ``learned``.
    ``denoise(x, sigma, class_labels)`` is the (EMA, optionally guided) denoiser; ``class_labels``
    is a float one-hot ``[B, num_classes]`` or None; ``guidance`` w != 1 applies classifier-free
    guidance (the all-zeros label is the unconditional model), or autoguidance when ``guide`` (a
    weaker denoiser with the same signature, given the same labels) is set. ``forward(z, labels)`` takes torch-fidelity's
    standard normal ``z`` (``[B, z_size]``) and integer labels and returns uint8 RGB images.
    :meth:`generate` is the seeded path: noise and labels drawn per sample index (EDM generate.py).
    ``decode`` maps samples of ``shape`` to images (a latent model's decoder), after sampling.
    ``dtype``: the sampler's working precision (float64 reproduces EDM generate.py's sampler).
    """

    def __init__(
        self,
        denoise: Denoise,
        schedule: Any,
        shape: Sequence[int],
        num_classes: int = 0,
        sampler: str = "heun",
        nfe: int = 35,
        discretization: str = "karras",
        options: dict | None = None,
        guidance: float = 1.0,
        device: torch.device | str = "cpu",
        sigmas: Sequence[float] | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        guide: Denoise | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.denoise = denoise
        self.schedule = schedule
        self.shape = tuple(int(s) for s in shape)
        self._num_classes = int(num_classes)
        self.sampler = sampler
        self.nfe = int(nfe)
        self.discretization = discretization
        self.sigmas = sigmas  # the fitted grid of discretization 'learned'
        self.options = dict(options or {})
        self.guidance = float(guidance)
        self.guide = guide
        self.device = torch.device(device)
        self.decode = decode
        self.dtype = dtype

    @property
    def z_size(self) -> int:
        return math.prod(self.shape)

    @property
    def z_type(self) -> str:
        return "normal"

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def one_hot(self, labels: Tensor | None) -> Tensor | None:
        """Integer labels -> float one-hot (None for unconditional models)."""
        if self._num_classes == 0 or labels is None:
            return None
        return F.one_hot(labels.long().to(self.device), self._num_classes).float()

    @torch.no_grad()
    def sample_images(
        self,
        noise: Tensor,
        labels: Tensor | None = None,
        generator: StackedRandomGenerator | torch.Generator | None = None,
    ) -> Tensor:
        """Run the sampler from standard normal ``noise`` [B, *shape] (then ``decode``); images
        in [-1, 1]."""
        one_hot = self.one_hot(labels)
        if self.guide is not None:  # autoguidance, Karras et al. 2024 eq. 1
            guide = self.guide
            denoise = cfg_denoiser(
                lambda x, sigma: self.denoise(x, sigma, one_hot),
                lambda x, sigma: guide(x, sigma, one_hot),
                self.guidance,
            )
        elif one_hot is not None and self.guidance != 1.0:
            denoise = label_cfg_denoiser(self.denoise, one_hot, self.guidance)
        else:

            def denoise(x: Tensor, sigma: Tensor) -> Tensor:
                return self.denoise(x, sigma, one_hot)

        x = sample(
            denoise,
            self.schedule,
            noise.to(self.device, self.dtype),
            sampler=self.sampler,
            nfe=self.nfe,
            discretization=self.discretization,
            options=self.options,
            generator=generator,
            grid_options={"sigmas": self.sigmas} if self.sigmas is not None else None,
        )
        return x if self.decode is None else self.decode(x)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return to_uint8_rgb(self.sample_images(z.view(-1, *self.shape), labels))

    def seeded_inputs(
        self, seeds: Sequence[int], class_label: int | None = None
    ) -> tuple[Tensor, Tensor | None, StackedRandomGenerator]:
        """Noise, labels and the per-sample generator for ``seeds``: row i depends on seeds[i] only.

        Labels are drawn from each sample's generator after its noise (EDM generate.py), also when
        ``class_label`` then fixes them, so a stochastic sampler's noise that follows is EDM's.
        """
        gen = StackedRandomGenerator(seeds, device=self.device)
        noise = gen.randn((len(seeds), *self.shape))
        labels = None
        if self._num_classes:
            labels = torch.stack(
                [
                    torch.randint(self._num_classes, (), generator=g, device=self.device)
                    for g in gen.generators
                ]
            )
            if class_label is not None:
                labels = torch.full_like(labels, int(class_label))
        return noise, labels, gen

    def generate(self, seeds: Sequence[int], class_label: int | None = None) -> Tensor:
        """Images in [-1, 1] for ``seeds``, independent of how seeds are batched."""
        noise, labels, gen = self.seeded_inputs(seeds, class_label)
        return self.sample_images(noise, labels, gen)
