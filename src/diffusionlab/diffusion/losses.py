"""The diffusion training loss E_{sigma ~ p_train} [lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2]
(EDM eq. 2 and 8), with the noise distribution and weighting as separate, swappable objects."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from diffusionlab.diffusion.noise import Generator, randn_like
from diffusionlab.diffusion.noise_distributions import (
    LogNormal,
    NoiseDistribution,
    UniformT,
    get_noise_distribution,
)
from diffusionlab.diffusion.parameterizations import EDMParam, Parameterization
from diffusionlab.diffusion.schedules import Schedule
from diffusionlab.diffusion.weightings import SimpleWeighting, Weighting, get_weighting


@runtime_checkable
class StepScheduled(Protocol):
    """A loss whose objective follows training (a curriculum: iCT's discretisation, ECT's gap,
    diffusion/consistency.py). The training module hands it the optimizer step before each batch,
    so the objective is a function of the step: equal on every rank and micro-batch, and replayed
    by a resumed run."""

    def set_step(self, step: int) -> None: ...


class DiffusionLoss(nn.Module):
    """Per-sample loss lambda(sigma) * w_is(sigma) * mean over non-batch dims of (D - x0)^2.

    ``w_is`` is the noise distribution's importance weight (1 unless it reweights). Dims are
    averaged, not summed, so loss scales do not depend on resolution. The weighting is a submodule:
    EDM2's uncertainty head trains with the model. Defaults: noise = log-normal for ``EDMParam``,
    else uniform t; weighting = ``SimpleWeighting`` (1 / c_out^2). Names (``"uniform_t"``,
    ``"min_snr"``, ...) are accepted for both.
    """

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        noise: NoiseDistribution | str | None = None,
        weighting: Weighting | str | None = None,
    ) -> None:
        super().__init__()
        if noise is None:
            noise = LogNormal() if isinstance(parameterization, EDMParam) else UniformT()
        self.schedule = schedule
        self.parameterization = parameterization
        self.noise = get_noise_distribution(noise) if isinstance(noise, str) else noise
        if weighting is None:
            weighting = SimpleWeighting()
        self.weighting = get_weighting(weighting) if isinstance(weighting, str) else weighting

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        generator: Generator = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (per-sample loss ``[B]``, sigma ``[B]``); float32 whatever ``x0``'s dtype.
        ``cond``: further network inputs (a text or image condition, ``networks/context.py``)."""
        sigma = self.noise.sample(x0.shape[0], self.schedule, generator, device=x0.device)
        x0_32 = x0.float()
        n = randn_like(x0_32, generator)
        sigma_b = sigma.view(-1, *([1] * (x0.ndim - 1)))
        noisy = (x0_32 + sigma_b * n).to(x0.dtype)
        d = denoiser(
            noisy, sigma, class_labels=class_labels, augment_labels=augment_labels, **(cond or {})
        )
        return self.weighted_error(d, x0_32, sigma), sigma

    def weighted_error(self, d: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
        """lambda(sigma) w_is(sigma) mean((D - x0)^2) per sample, in float32 (``x0`` float32)."""
        mse = (d.float() - x0).square().flatten(1).mean(1)
        mse = mse * self.noise.importance_weight(sigma, self.schedule)
        return self.weighting(mse, sigma, self.parameterization)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, parameterization={self.parameterization}"
