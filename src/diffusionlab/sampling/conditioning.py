"""What a model is conditioned on, wired once for every app and callback.

A condition kind says how a sample's condition is drawn from its own seed, how a requested value
is encoded for the network, what the unconditional input is (classifier-free guidance), and under
which network input the encoded condition goes. Class labels are the kind today; a text or image
condition is one more subclass, returned by :func:`condition_of` for the models that take it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.noise import StackedRandomGenerator

# a per-sample generator (sampler.noise: per_seed or batched)
SampleGenerator = StackedRandomGenerator | BatchedGenerator

# ``denoise(x, sigma, cond)``: a denoiser given an encoded condition (None: unconditional)
CondDenoise = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class Condition(ABC):
    """One kind of condition. ``num_classes`` is torch-fidelity's class-conditional interface
    (0 for kinds that are not class labels)."""

    kind: str = ""
    num_classes: int = 0

    @abstractmethod
    def draw(self, generator: SampleGenerator, device: torch.device) -> Tensor:
        """One value per sample, each from its own generator (after its noise, EDM generate.py)."""

    @abstractmethod
    def fixed(self, value: Any, n: int, device: torch.device) -> Tensor:
        """``value`` (a requested condition) for ``n`` samples."""

    @abstractmethod
    def encode(self, values: Tensor) -> Tensor:
        """Values -> what the network takes."""

    def null(self, encoded: Tensor) -> Tensor:
        """The unconditional input for a batch of encoded conditions (what label dropout trains)."""
        return torch.zeros_like(encoded)

    @abstractmethod
    def network_inputs(self, encoded: Tensor) -> dict[str, Tensor]:
        """The keyword arguments that carry the encoded condition to the denoiser."""


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


def condition_of(module: Any) -> Condition | None:
    """The condition a trained model takes, from its hyperparameters (None: unconditional)."""
    return ClassLabels(module.label_dim) if module.label_dim else None


def conditioned(net: Callable[..., Tensor], condition: Condition | None) -> CondDenoise:
    """``denoise(x, sigma, cond)`` over a denoiser module ``net(x, sigma, **inputs)``: the
    encoded condition goes in as the condition kind says; None runs the model unconditioned."""

    def denoise(x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            return net(x, sigma)
        if condition is None:
            raise ValueError("a condition was given to an unconditional model")
        return net(x, sigma, **condition.network_inputs(cond))

    return denoise
