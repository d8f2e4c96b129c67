"""Continuous-time consistency models in sigma-space: sCM (Lu & Song 2024, "Simplifying,
stabilizing and scaling continuous-time consistency models"), as consistency training (sCT) or
distillation (sCD).

TrigFlow's x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), is EDM's x~ = x0 + sigma n scaled by
cos t, with sigma = sigma_d tan t; its consistency function f = cos(t) x_t - sin(t) sigma_d F_trig
(sCM eq. 6) is EDM's preconditioned denoiser with the boundary at sigma = 0: c_skip = cos^2 t =
sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma_d sin t, F_trig = -F_EDM. So sCM trains
``parameterization=consistency`` with ``sigma_min=0`` (or ECT's ``train_coefficients=edm``), on
our networks as they are, and samples with ``sampler=consistency``.

The loss (sCM eq. 8 and Alg. 1; NVlabs/FastGen ``SCMModel``), per sample:

    w(sigma) / e^u(sigma) * mean_d (F_theta - sg F_theta - g)^2 + u(sigma),
    g = -cos^2 t (sigma_d F_trig - dx_t/dt) - r cos t sin t (x_t + sigma_d dF_trig/dt),

whose gradient is that of E[f_theta . sg(df/dt)], the discrete consistency loss's as the gap
goes to 0. dx_t/dt is the sample's own (sCT: x0 and z known) or the teacher's PF-ODE (sCD);
dF/dt comes by forward-mode AD (``torch.func.jvp``) through the whole network. r ramps from 0 to
1 over ``warmup_steps`` (tangent warm-up), g / (||g|| + c) normalises the tangent (c = 0.1; ||.||
the RMS over a sample's dims, FastGen's default, or the L2 norm of the paper's text),
w = 1 / sigma is the prior weighting and u a learned log-variance (adaptive weighting, the
Fourier head of EDM2's uncertainty, ``weightings.UncertaintyWeighting``).

In sigma-space, with rho = sqrt(sigma^2 + sigma_d^2), cos t = sigma_d / rho and sin t = sigma /
rho: dx_t/dt = -sin t x~ + rho v with v = dx~/dsigma (z, or (x~ - D(x~; sigma)) / sigma),
sigma_d F_trig = (cos^2 t x~ - f) / sin t, cos t df/dt = rho df/dsigma (dsigma/dt = rho^2 /
sigma_d), F_theta - sg F_theta = -(f_theta - sg f_theta) / (sigma_d sin t). The total derivative
df/dsigma is the JVP of ``denoise(x, sigma)`` along (v, 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusionlab.diffusion.consistency import ConsistencyObjective, TeacherSlot, _col
from diffusionlab.diffusion.noise import Generator
from diffusionlab.diffusion.parameterizations import EDMParam, Parameterization
from diffusionlab.diffusion.schedules import Schedule, _check
from diffusionlab.diffusion.weightings import UncertaintyWeighting
from diffusionlab.errors import ConfigError


def total_derivative(
    fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """(fn(x, sigma), d/dsigma fn(x(sigma), sigma)) along dx/dsigma = ``v``, by forward-mode AD
    (``torch.func.jvp``) without a graph. Autocast is off (the time embedding and its derivative
    in float32) and attention takes the math kernel (the fused CPU and CUDA ones have no
    forward-mode derivative)."""
    no_autocast = torch.autocast(x.device.type, enabled=False)
    with torch.no_grad(), no_autocast, sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, (x, sigma), (v, torch.ones_like(sigma)))


class SCMLoss(ConsistencyObjective, TeacherSlot):
    """sCM (Lu & Song 2024): the continuous-time consistency loss of the module docstring.

    ``tangent``: ``data`` (sCT, dx~/dsigma = z) or ``teacher`` (sCD, the teacher's PF-ODE
    (x~ - D(x~; sigma)) / sigma; the teacher from ``teacher_ckpt`` or ``init_ckpt``,
    :class:`~diffusionlab.diffusion.consistency.TeacherSlot`). ln sigma ~ N(P_mean, P_std^2)
    (CIFAR-10: -1.0, 1.4, App. G), tangent warm-up over ``warmup_steps`` (10k in the paper),
    normalisation constant ``norm_c`` = 0.1 with ``tangent_norm`` ``rms`` or ``l2`` (``none``:
    off), ``prior_weighting`` w = 1 / sigma, ``adaptive`` the learned u (``channels`` Fourier
    features). The parameterization must train with TrigFlow's (EDM's) coefficients."""

    TANGENTS = ("data", "teacher")
    NORMS = ("rms", "l2", "none")
    config_name = "scm"

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        tangent: str = "data",
        teacher_ckpt: str | None = None,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        warmup_steps: int = 10_000,
        norm_c: float = 0.1,
        tangent_norm: str = "rms",
        prior_weighting: bool = True,
        adaptive: bool = True,
        channels: int = 128,
    ) -> None:
        super().__init__(schedule, parameterization)
        _check(tangent in self.TANGENTS, "tangent", tangent, f"valid: {list(self.TANGENTS)}")
        _check(tangent_norm in self.NORMS, "tangent_norm", tangent_norm, f"valid: {self.NORMS}")
        _check(p_std > 0, "p_std", p_std, "must be > 0")
        _check(int(warmup_steps) >= 0, "warmup_steps", warmup_steps, "must be >= 0")
        _check(norm_c >= 0, "norm_c", norm_c, "must be >= 0")
        if not isinstance(parameterization, EDMParam) or self.boundary != 0:
            raise ConfigError(
                f"loss=scm trains TrigFlow's consistency function, EDM's coefficients with the "
                f"boundary at sigma = 0: parameterization=consistency with "
                f"parameterization.sigma_min=0 or parameterization.train_coefficients=edm "
                f"(got {parameterization})"
            )
        self.tangent, self.tangent_norm = tangent, tangent_norm
        self.teacher_ckpt = None if teacher_ckpt is None else str(teacher_ckpt)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.warmup_steps, self.norm_c = int(warmup_steps), float(norm_c)
        self.prior_weighting = bool(prior_weighting)
        self.sigma_data = parameterization.sigma_data
        # u(sigma): a zero-initialised linear head on Fourier features of ln(sigma) / 4
        self.adaptive = UncertaintyWeighting(channels=channels) if adaptive else None

    @property
    def needs_teacher(self) -> bool:
        return self.tangent == "teacher"

    def warmup(self) -> float:
        """r at the current step: min(1, step / warmup_steps) (1 without warm-up)."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, self.step / self.warmup_steps)

    def draw_sigma(self, n: int, generator: Generator, device: torch.device) -> Tensor:
        """Log-normal sigma (float64), each sample's own: TrigFlow's tan t = e^tau / sigma_d."""
        return torch.exp(self.p_mean + self.p_std * self.normal(n, generator, device))

    def velocity(
        self, x: Tensor, sigma: Tensor, z: Tensor, class_labels: Tensor | None, **cond: Tensor
    ) -> Tensor:
        """dx~/dsigma at (x~, sigma): the sample's noise z (sCT) or the teacher's PF-ODE
        (x~ - D(x~; sigma)) / sigma (sCD; it reads the class labels and the condition, not the
        augmentation)."""
        if self.tangent == "data":
            return z
        teacher = self.teacher_on(x.device)
        with torch.no_grad():
            d = teacher(x, sigma, class_labels=class_labels, **cond).to(x.dtype)
        return (x - d) / _col(sigma, x)

    def trig(self, sigma: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rho, cos t, sin t) as columns against ``x``: rho = sqrt(sigma^2 + sigma_d^2),
        cos t = sigma_d / rho, sin t = sigma / rho."""
        rho = torch.sqrt(sigma.square() + self.sigma_data**2)
        return _col(rho, x), _col(self.sigma_data / rho, x), _col(sigma / rho, x)

    def tangent_g(
        self, x: Tensor, sigma: Tensor, v: Tensor, f: Tensor, df: Tensor, r: float
    ) -> Tensor:
        """sCM's g (eq. 8 with warm-up r, before normalisation) from f and df/dsigma at x~."""
        rho, cos, sin = self.trig(sigma, x)
        dxt_dt = -sin * x + rho * v
        sd_f_trig = (cos.square() * x - f) / sin
        g1 = -cos.square() * (sd_f_trig - dxt_dt)
        return g1 + r * (rho * df - g1)  # cos t df/dt = rho df/dsigma = g1 + g2

    def normalise(self, g: Tensor) -> Tensor:
        """g / (||g|| + c) per sample (tangent normalisation)."""
        if self.tangent_norm == "none":
            return g
        norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
        if self.tangent_norm == "rms":
            norm = norm / g[0].numel() ** 0.5
        return g / (_col(norm, g) + self.norm_c)

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        generator: Generator = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(per-sample loss ``[B]``, sigma ``[B]``) in float32 (float64 for float64 data)."""
        work = torch.promote_types(x0.dtype, torch.float32)
        sigma = self.draw_sigma(x0.shape[0], generator, x0.device).to(work)
        x0_w = x0.to(work)
        z = self.noise(x0_w, generator)
        x = x0_w + _col(sigma, x0) * z
        cond = dict(cond or {})
        v = self.velocity(x, sigma, z, class_labels, **cond)

        def f_of(y: Tensor, s: Tensor) -> Tensor:
            out = denoiser(y.to(x0.dtype), s, class_labels, augment_labels, **cond)
            return out.to(work)

        f_sg, df = total_derivative(f_of, x, sigma, v)
        g = self.normalise(self.tangent_g(x, sigma, v, f_sg, df, self.warmup()))
        f = f_of(x, sigma)  # last: a feature hook (REPA) keeps this pass's activations
        sin = self.trig(sigma, x)[2]
        d_f_trig = -(f - f.detach()) / (self.sigma_data * sin)  # F - sg F: 0, F's gradient
        err = (d_f_trig - g).square().flatten(1).mean(1)
        if self.prior_weighting:
            err = err / sigma
        if self.adaptive is None:
            return err, sigma
        u = self.adaptive.logvar(sigma)
        return err / u.exp() + u, sigma

    def extra_repr(self) -> str:
        return (
            f"tangent={self.tangent!r}, p_mean={self.p_mean}, p_std={self.p_std}, "
            f"warmup_steps={self.warmup_steps}, norm_c={self.norm_c}, "
            f"tangent_norm={self.tangent_norm!r}, prior_weighting={self.prior_weighting}"
        )
