"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") in sigma-space.

The model is a flow map (``parameterization=flow_map``, ``parameterizations.FlowMapParam``).
In rectified-flow time, z_t = (1 - t) x0 + t n = x~ / (1 + sigma) with t = sigma / (1 + sigma),
its average velocity over [r, t] is u(z_t, r, t) = (z_t - z_r) / (t - r) = (z_t - D) / t with
D = D(x~; sigma_t, sigma_r). MeanFlow trains u by the MeanFlow identity (eq. 6),

    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,    du/dt = v . d_z u + d_t u,

with the conditional velocity v = n - x0 in place of v(z_t, t) and du/dt by forward-mode AD
through the whole denoiser (``torch.func.jvp`` along (v, 1) with r held, eq. 8), both under a
stop-gradient, and the adaptive loss (sec. 4.3, eq. 9-10):

    L = sg(w) ||u_theta - u_tgt||^2,  u_tgt = sg(v - (t - r) du/dt),  w = 1 / (||.||^2 + c)^p,

||.||^2 summed over the sample. ``velocity=teacher`` distils instead: v is a trained diffusion
teacher's PF-ODE velocity (z_t - D_teacher(x~; sigma)) / t, the marginal velocity the identity
is written with, so the target has no data noise and the flow map converges to the teacher's
ODE. (t, r): two logit-normal draws, logit t ~ N(P_mean, P_std^2)
(= ln sigma: a log-normal sigma), t the larger; r = t (the flow-matching loss) unless the
sample's uniform draw falls below ``ratio`` (the share of r != t). Defaults: the ImageNet
ablation's best (P_mean -0.4, P_std 1.0, ratio 0.25, p 1.0, c 1e-3; Table 1); CIFAR-10 used
(-2.0, 2.0, 0.75, p 0.75). Every draw is the sample's own (``diffusion/seeds.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.consistency import ConsistencyObjective, TeacherSlot, _col
from diffusionlab.diffusion.continuous_consistency import total_derivative
from diffusionlab.diffusion.noise import Generator
from diffusionlab.diffusion.parameterizations import FlowMapParam, Parameterization
from diffusionlab.diffusion.schedules import Schedule, _check
from diffusionlab.diffusion.seeds import CONSISTENCY_SIGMA_STREAM, MEANFLOW_RATIO_STREAM
from diffusionlab.errors import ConfigError


class MeanFlowLoss(ConsistencyObjective, TeacherSlot):
    """The MeanFlow loss of the module docstring, per sample; ``velocity`` ``data`` (MeanFlow's
    n - x0) or ``teacher`` (its PF-ODE; the teacher from ``teacher_ckpt`` or ``init_ckpt``,
    :class:`~diffusionlab.diffusion.consistency.TeacherSlot`), ``p_mean``/``p_std`` of logit t,
    ``ratio`` the share of pairs with r != t, ``power`` p and ``c`` of the adaptive weight
    (``power`` 0: the plain squared error)."""

    VELOCITIES = ("data", "teacher")
    config_name = "meanflow"

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        velocity: str = "data",
        teacher_ckpt: str | None = None,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        ratio: float = 0.25,
        power: float = 1.0,
        c: float = 1e-3,
    ) -> None:
        super().__init__(schedule, parameterization)
        if not isinstance(parameterization, FlowMapParam):
            raise ConfigError(
                "loss=meanflow trains a flow map, a denoiser that reads where its step ends: "
                f"parameterization=flow_map (got {parameterization})"
            )
        _check(velocity in self.VELOCITIES, "velocity", velocity, f"valid: {self.VELOCITIES}")
        _check(p_std > 0, "p_std", p_std, "must be > 0")
        _check(0 <= ratio <= 1, "ratio", ratio, "must be in [0, 1]")
        _check(power >= 0, "power", power, "must be >= 0")
        _check(c > 0, "c", c, "must be > 0")
        self.p_mean, self.p_std, self.ratio = float(p_mean), float(p_std), float(ratio)
        self.power, self.c = float(power), float(c)
        self.velocity = velocity
        self.teacher_ckpt = None if teacher_ckpt is None else str(teacher_ckpt)

    @property
    def needs_teacher(self) -> bool:
        return self.velocity == "teacher"

    def draw_sigmas(
        self, n: int, generator: Generator, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(sigma_t, sigma_r), float64 ``[n]`` each, sigma_r <= sigma_t: ln sigma = logit t."""
        if isinstance(generator, BatchedGenerator):
            g = generator.normal((2,), CONSISTENCY_SIGMA_STREAM).double().to(device)
            u = generator.uniform((1,), MEANFLOW_RATIO_STREAM)[:, 0].double().to(device)
        else:
            g = torch.stack([self.normal(n, generator, device) for _ in range(2)], dim=1)
            u = self.uniform(n, generator, device)
        sig = torch.exp(self.p_mean + self.p_std * g)
        hi, lo = sig.max(dim=1).values, sig.min(dim=1).values
        return hi, torch.where(u < self.ratio, lo, hi)

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        generator: Generator = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(per-sample loss ``[B]``, sigma_t ``[B]``) in float32 (float64 for float64 data)."""
        work = torch.promote_types(x0.dtype, torch.float32)
        sig_t, sig_r = (s.to(work) for s in self.draw_sigmas(x0.shape[0], generator, x0.device))
        t, r = sig_t / (1 + sig_t), sig_r / (1 + sig_r)
        x0_w = x0.to(work)
        n = self.noise(x0_w, generator)
        z = x0_w + _col(t, x0_w) * (n - x0_w)
        v = n - x0_w
        if self.velocity == "teacher":
            teacher = self.teacher_on(x0.device)
            v_of = self.average_velocity(teacher, None, x0.dtype, class_labels, None, cond)
            with torch.no_grad():
                v = v_of(z, t)
        u_of = self.average_velocity(denoiser, sig_r, x0.dtype, class_labels, augment_labels, cond)
        target = self.target(u_of, z, t, r, v)
        u = u_of(z, t)  # last: a feature hook (REPA) keeps this pass's activations
        err = (u - target).square().flatten(1).sum(1)
        return err * (err.detach() + self.c).pow(-self.power), sig_t

    @staticmethod
    def average_velocity(
        denoiser: nn.Module,
        sigma_r: Tensor | None,
        dtype: torch.dtype,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """u(z_t, t) = (z_t - D(z_t / (1 - t); t / (1 - t), sigma_r)) / t for the flow map
        ``denoiser`` (its network in ``dtype``), r held at sigma_r / (1 + sigma_r); with
        ``sigma_r`` None, a one-time denoiser's velocity (z_t - D(x~; sigma)) / t."""
        cond = dict(cond or {})
        end = {} if sigma_r is None else {"sigma_end": sigma_r}

        def u_of(z: Tensor, t: Tensor) -> Tensor:
            x = z / _col(1 - t, z)
            d = denoiser(x.to(dtype), t / (1 - t), class_labels, augment_labels, **end, **cond)
            return (z - d.to(z.dtype)) / _col(t, z)

        return u_of

    @staticmethod
    def target(
        u_of: Callable[[Tensor, Tensor], Tensor], z: Tensor, t: Tensor, r: Tensor, v: Tensor
    ) -> Tensor:
        """u_tgt = v - (t - r) du/dt along dz/dt = v (eq. 10), without a graph."""
        _, du_dt = total_derivative(u_of, z, t, v)
        return v - _col(t - r, z) * du_dt

    def extra_repr(self) -> str:
        return (
            f"velocity={self.velocity!r}, p_mean={self.p_mean}, p_std={self.p_std}, ratio={self.ratio}, power={self.power}, "
            f"c={self.c}"
        )
