"""Parameterizations as EDM preconditioning coefficients, and the ``Denoiser`` module.

D(x~; sigma) = c_skip(sigma) x~ + c_out(sigma) F(c_in(sigma) x~; c_noise(sigma))  (EDM eq. 7),
with x~ = x / s = x0 + sigma n. EDM Table 1 gives the VP, VE and EDM rows; v and flow are derived
in the same space. The network's time input ``c_noise`` is chosen by ``c_noise``:

- ``"log"``:   ln(sigma) / 4 (EDM)
- ``"t"``:     ``t_scale`` * schedule.t_of_sigma(sigma) (999 t for VP as EDM's VPPrecond,
  1000 t for flow; on a discrete schedule t is the fractional step index)
- ``"index"``: the nearest integer step in 0..T-1 of a discrete schedule (DDPM / iDDPM nets)
- ``"auto"``:  ``"index"`` on discrete schedules, ``"t"`` on VP (t_scale 999) and flow (1000)
  schedules, else ``"log"``.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from diffusionlab.diffusion.schedules import Schedule, VPSchedule, _check

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]
C_NOISE_KINDS = ("auto", "log", "t", "index")


def _unwrap(schedule: Schedule) -> Schedule:
    """The innermost base of shifted schedules."""
    while hasattr(schedule, "base"):
        schedule = schedule.base
    return schedule


class Parameterization(ABC):
    """Coefficient functions of one parameterization; subclasses define ``_coefficients``."""

    # the width of the second-time features a flow-map network reads (0: one time only)
    end_features = 0

    def __init__(
        self,
        schedule: Schedule,
        c_noise: str = "auto",
        t_scale: float | None = None,
        learned_variance: bool = False,
    ) -> None:
        _check(c_noise in C_NOISE_KINDS, "c_noise", c_noise, f"valid values: {list(C_NOISE_KINDS)}")
        if c_noise == "index":
            _check(
                schedule.discrete, "c_noise", c_noise, f"needs a discrete schedule, got {schedule}"
            )
        _check(t_scale is None or t_scale > 0, "t_scale", t_scale, "must be > 0")
        self.schedule = schedule
        self.c_noise_kind, self.t_scale = self._resolve(c_noise, t_scale)
        # iDDPM (Nichol & Dhariwal 2021 eq. 15): F has 2C channels, the second C interpolate the
        # reverse step's log-variance (diffusion/iddpm.py); D uses the first C only
        self.learned_variance = bool(learned_variance)

    def _resolve(self, c_noise: str, t_scale: float | None) -> tuple[str, float]:
        if c_noise != "auto":
            return c_noise, 1.0 if t_scale is None else t_scale
        if self.schedule.discrete:
            return "index", 1.0
        if isinstance(_unwrap(self.schedule), VPSchedule):
            return "t", 999.0 if t_scale is None else t_scale
        if self.schedule.scale_kind == "flow":
            return "t", 1000.0 if t_scale is None else t_scale
        return "log", 1.0

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The network's noise-level input (see module docstring)."""
        if self.c_noise_kind == "log":
            return sigma.log() / 4
        if self.c_noise_kind == "index":
            return self.schedule.sigma_to_index(sigma).to(sigma.dtype)
        return self.t_scale * self.schedule.t_of_sigma(sigma)

    @abstractmethod
    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in)."""

    def coefficients(
        self, sigma: Tensor | float, check: bool = True, training: bool = False
    ) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (EDM eq. 7), same shape as ``sigma``.
        ``check``: stop on sigma <= 0 (reads sigma back to the host; the denoiser's per-call
        path leaves it out, so a training or sampling step never waits for the device).
        ``training``: the denoiser is in training mode (only :class:`ConsistencyParam` with
        ``train_coefficients="edm"`` differs there)."""
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.get_default_dtype())
        if check:
            _check(bool((sigma > 0).all()), "sigma", float(sigma.min()), "must be > 0")
        return (*self._mode_coefficients(sigma, training), self.c_noise(sigma))

    def _mode_coefficients(self, sigma: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) in training or evaluation mode: the same unless overridden."""
        return self._coefficients(sigma)

    @classmethod
    def network_config(cls, cfg: dict) -> dict:
        """The config (``_target_`` and arguments) of the parameterization whose network F means
        what this one's F means, for checking that ``init_ckpt`` weights fit a run: itself,
        except where a subclass shares another's network (:class:`ConsistencyParam`)."""
        return cfg

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda = 1 / c_out^2: D-space weight equal to the MSE on F's own target."""
        return 1 / self._coefficients(sigma)[1] ** 2

    def __repr__(self) -> str:
        lv = ", learned_variance=True" if self.learned_variance else ""
        return f"{type(self).__name__}(c_noise={self.c_noise_kind!r}, t_scale={self.t_scale:g}{lv})"


class EpsParam(Parameterization):
    """eps prediction (DDPM; EDM Table 1 VP): c_skip 1, c_out -sigma, c_in 1/sqrt(1+sigma^2)."""

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, torch.rsqrt(1 + sigma**2)


class X0Param(Parameterization):
    """x0 prediction: c_skip 0, c_out 1, c_in 1/sqrt(1+sigma^2)."""

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros_like(sigma), torch.ones_like(sigma), torch.rsqrt(1 + sigma**2)


class VParam(Parameterization):
    """v prediction (Salimans & Ho 2022 sec. 4): v = alpha eps - sigma_vp x0 on z = alpha x~.

    With alpha = 1/sqrt(1+sigma^2), x0 = alpha z - sigma_vp v gives c_skip 1/(1+sigma^2),
    c_out -sigma/sqrt(1+sigma^2), c_in 1/sqrt(1+sigma^2).
    """

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = torch.rsqrt(1 + sigma**2)
        return c_in**2, -sigma * c_in, c_in


class EDMParam(Parameterization):
    """EDM preconditioning (Karras et al. 2022, Table 1 / eq. 7); c_noise defaults to ln(sigma)/4."""

    def __init__(
        self,
        schedule: Schedule,
        sigma_data: float = 0.5,
        c_noise: str = "log",
        t_scale: float | None = None,
    ) -> None:
        _check(sigma_data > 0, "sigma_data", sigma_data, "must be > 0")
        self.sigma_data = float(sigma_data)
        super().__init__(schedule, c_noise, t_scale)

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_in = torch.rsqrt(sigma**2 + sd2)
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data * c_in, c_in


class FlowParam(Parameterization):
    """Rectified-flow velocity (Liu et al. 2022): F predicts v = n - x0 from x_t = x~ / (1 + sigma).

    x0 = x_t - t v with t = sigma / (1 + sigma): c_skip = c_in = 1/(1+sigma), c_out = -sigma/(1+sigma).
    """

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in


class ConsistencyParam(EDMParam):
    """Consistency-model parameterization (Song et al. 2023, Appendix C; iCT; ECT's ``ECMPrecond``):
    f(x~; sigma) = c_skip x~ + c_out F(c_in x~; c_noise) with

        c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
        c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),

    so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0: the boundary condition f(x~; sigma_min) =
    x~ holds exactly (the difference is 0 in any precision). The inputs are EDM's (c_in =
    1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4), so F is the F of an EDM model
    with the same ``sigma_data``, ``c_noise`` and ``t_scale``: Easy Consistency Tuning starts from
    one (``init_ckpt=``). f is defined on [sigma_min, sigma_max]; below sigma_min c_out is negative
    and the consistency losses use x~ itself (the boundary extended, diffusion/consistency.py).
    The samplers see f through ``denoise(x, sigma)``; ``sampler=consistency`` is its sampler.

    ``train_coefficients``: ``"consistency"`` (these coefficients in training too) or ``"edm"``
    (EDM's c_skip and c_out while the denoiser is in training mode, these at evaluation: ECT's
    ``ECMPrecond``, locuslab/ect; the boundary then holds for the sampling weights only)."""

    TRAIN_COEFFICIENTS = ("consistency", "edm")

    def __init__(
        self,
        schedule: Schedule,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        c_noise: str = "log",
        t_scale: float | None = None,
        train_coefficients: str = "consistency",
    ) -> None:
        _check(sigma_min >= 0, "sigma_min", sigma_min, "must be >= 0")
        _check(
            train_coefficients in self.TRAIN_COEFFICIENTS,
            "train_coefficients",
            train_coefficients,
            f"valid values: {list(self.TRAIN_COEFFICIENTS)}",
        )
        self.sigma_min = float(sigma_min)
        self.train_coefficients = train_coefficients
        super().__init__(schedule, sigma_data, c_noise, t_scale)

    @property
    def training_boundary(self) -> float:
        """The level at and below which f(x~) = x~ while training: sigma_min, or 0 with EDM's
        coefficients in training (there only sigma = 0 gives x~ itself, as in ECT's ECMLoss)."""
        return 0.0 if self.train_coefficients == "edm" else self.sigma_min

    def _mode_coefficients(self, sigma: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
        if training and self.train_coefficients == "edm":
            return super()._coefficients(sigma)
        return self._coefficients(sigma)

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_in = torch.rsqrt(sigma**2 + sd2)
        delta = sigma - self.sigma_min  # 0 at sigma_min in sigma's own dtype
        return sd2 / (delta**2 + sd2), delta * self.sigma_data * c_in, c_in

    @classmethod
    def network_config(cls, cfg: dict) -> dict:
        """The EDM config with the same F (``sigma_min`` and ``train_coefficients`` shape only
        the skip path)."""
        out = {k: v for k, v in cfg.items() if k not in ("sigma_min", "train_coefficients")}
        return {**out, "_target_": f"{EDMParam.__module__}.{EDMParam.__qualname__}"}

    def __repr__(self) -> str:
        train = "" if self.train_coefficients == "consistency" else ", train_coefficients='edm'"
        return f"{super().__repr__()[:-1]}, sigma_min={self.sigma_min:g}{train})"


class FlowMapParam(EDMParam):
    """A flow map Phi(x~; sigma -> s), the PF-ODE's solution from sigma to s <= sigma, as a
    denoiser with two times (MeanFlow, Geng et al. 2025, in sigma-space):

        Phi(x~; sigma -> s) = (s / sigma) x~ + (1 - s / sigma) D(x~; sigma, s),
        D(x~; sigma, s) = c_skip x~ + c_out F(c_in x~; c_noise(sigma), h(sigma, s)),

    the DDIM / Euler step with a D that knows where the step ends: Phi(x~; sigma -> sigma) = x~
    exactly, D(x~; sigma, sigma) is an ordinary denoiser (every sampler runs the model as a
    diffusion model) and D(x~; sigma, 0) a consistency function. In rectified-flow time
    (z_t = (1 - t) x0 + t n, t = sigma / (1 + sigma)) MeanFlow's average velocity is
    u(z_t, r, t) = (z_t - z_r) / (t - r) = (z_t - D) / t. The coefficients and c_noise are EDM's,
    so F is an EDM model's F (``init_ckpt=`` starts from one); the second time enters F as the
    gap h = t - r (MeanFlow's best "(t, t - r)" conditioning) in the sinusoidal embedding the
    networks give c_noise, through their ``cond_vector`` (networks/context.py), after a
    condition's own vector. (Sharper features, the 2^k / 4 frequencies of
    ``level_features`` of an image condition's augmentation level, made the JVP's d/dt noisy
    and learned the 1-D closed form several times worse.)"""

    end_features = 16

    @functools.cached_property
    def gap_embedding(self) -> nn.Module:
        """The networks' sinusoidal embedding, ``end_features`` wide (stateless)."""
        from diffusionlab.networks.layers import PositionalEmbedding  # networks import diffusion/

        return PositionalEmbedding(self.end_features, endpoint=True)

    def end_vector(self, sigma: Tensor, sigma_end: Tensor) -> Tensor:
        """``[B, 16]``: the embedding of h = t - r, t = sigma / (1 + sigma), r = s / (1 + s)."""
        return self.gap_embedding(sigma / (1 + sigma) - sigma_end / (1 + sigma_end))

    @classmethod
    def network_config(cls, cfg: dict) -> dict:
        """The EDM config: F reads an EDM model's inputs (the second time is an extra input)."""
        return {**cfg, "_target_": f"{EDMParam.__module__}.{EDMParam.__qualname__}"}


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    "eps": EpsParam,
    "x0": X0Param,
    "v": VParam,
    "edm": EDMParam,
    "flow": FlowParam,
}
# f of a consistency model (and a flow map below its start) maps x~ along its PF-ODE trajectory,
# not to E[x0 | x~]: kept apart from the diffusion parameterizations above (their checks train D
# towards x0)
CONSISTENCY_PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    "consistency": ConsistencyParam,
    "flow_map": FlowMapParam,
}


def get_parameterization(name: str, schedule: Schedule, **options: object) -> Parameterization:
    """Build a parameterization by name."""
    known = {**PARAMETERIZATIONS, **CONSISTENCY_PARAMETERIZATIONS}
    _check(name in known, "parameterization", name, f"unknown; valid names: {sorted(known)}")
    return known[name](schedule, **options)


# ---------------------------------------------------------------- prediction conversions
PREDICTIONS = ("x0", "eps", "v", "score", "velocity")


def to_x0(kind: str, pred: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The x0 estimate from a prediction of ``kind`` at x~ = ``x``, noise level ``sigma``.

    eps: x~ = x0 + sigma eps; score: grad log p = -eps / sigma (Tweedie); v: Salimans & Ho v;
    velocity: rectified-flow u = eps - x0.
    """
    _check(kind in PREDICTIONS, "prediction", kind, f"valid values: {list(PREDICTIONS)}")
    if kind == "x0":
        return pred
    if kind == "eps":
        return x - sigma * pred
    if kind == "score":
        return x + sigma**2 * pred
    if kind == "v":
        return x / (1 + sigma**2) - sigma * torch.rsqrt(1 + sigma**2) * pred
    return (x - sigma * pred) / (1 + sigma)


def from_x0(kind: str, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The prediction of ``kind`` implied by the x0 estimate ``x0`` (inverse of ``to_x0``)."""
    _check(kind in PREDICTIONS, "prediction", kind, f"valid values: {list(PREDICTIONS)}")
    if kind == "x0":
        return x0
    eps = (x - x0) / sigma
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / sigma
    if kind == "v":
        return (eps - sigma * x0) * torch.rsqrt(1 + sigma**2)
    return eps - x0


def convert(pred: Tensor, source: str, target: str, x: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction between x0, eps, v, score and velocity at (x~, sigma)."""
    return from_x0(target, to_x0(source, pred, x, sigma), x, sigma)


# ---------------------------------------------------------------- the denoiser
def _per_sample_sigma(sigma: Tensor | float, x: Tensor, dtype: torch.dtype) -> Tensor:
    """sigma as ``[B]``: a scalar is broadcast, ``[B]`` or ``[B, 1, ...]`` is flattened."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.numel() == 1:
        return sigma.reshape(1).expand(x.shape[0])
    _check(
        sigma.numel() == x.shape[0], "sigma", tuple(sigma.shape), f"need 1 or {x.shape[0]} values"
    )
    return sigma.reshape(x.shape[0])


class Denoiser(nn.Module):
    """D(x~; sigma) = c_skip x~ + c_out F(c_in x~, c_noise, class_labels, augment_labels).

    Further keyword arguments (``context``, ``context_mask``, ``cond_vector``, ``cond_image``: the
    condition inputs of text- and image-conditioned networks) go to F unchanged. ``sigma_end``:
    where a flow map's step ends (:class:`FlowMapParam`: its features follow the condition's
    vector; default ``sigma``, the diffusion denoiser); a one-time model ignores it, so
    ``sampler=flow_map`` is Euler's method on it.

    F runs in its parameters' dtype and gets a float32 ``[B]`` c_noise; coefficients and the skip
    connection run in float32 (float64 when ``x`` is float64); the result has ``x``'s dtype.
    With ``learned_variance`` F outputs 2C channels: D uses the first C and the second C, the
    variance interpolation v, is returned by :meth:`forward_with_variance` and rides on D as the
    attribute ``learned_variance``, so samplers that see only ``denoise(x, sigma)`` can use it.
    """

    # F's input dtype on CUDA when set (None: its parameters' dtype); NVlabs ``use_fp16`` models
    # run F in float16 on CUDA (interop/), as their preconditioning wrappers do
    cuda_net_dtype: torch.dtype | None = None

    def __init__(self, net: nn.Module, parameterization: Parameterization) -> None:
        super().__init__()
        self.net = net
        self.parameterization = parameterization

    @property
    def schedule(self) -> Schedule:
        return self.parameterization.schedule

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        sigma_end: Tensor | float | None = None,
        **cond: Tensor,
    ) -> Tensor:
        d, v = self.forward_with_variance(x, sigma, class_labels, augment_labels, sigma_end, **cond)
        if v is not None:
            d.learned_variance = v
        return d

    def forward_with_variance(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        sigma_end: Tensor | float | None = None,
        **cond: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """(D, v): v is the network's variance output (None without ``learned_variance``)."""
        work = torch.promote_types(x.dtype, torch.float32)
        sigma = _per_sample_sigma(sigma, x, work)
        if self.parameterization.end_features:
            end = sigma if sigma_end is None else _per_sample_sigma(sigma_end, x, work)
            cond = self.with_end_vector(cond, self.parameterization.end_vector(sigma, end))
        c_skip, c_out, c_in, c_noise = self.parameterization.coefficients(
            sigma, check=False, training=self.training
        )
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in = c_skip.view(shape), c_out.view(shape), c_in.view(shape)
        param = next(self.net.parameters(), None)
        net_dtype = x.dtype if param is None else param.dtype
        if self.cuda_net_dtype is not None and x.device.type == "cuda":
            net_dtype = self.cuda_net_dtype
        xw = x.to(work)
        out = self.net(
            (c_in * xw).to(net_dtype),
            c_noise.float(),
            class_labels=class_labels,
            augment_labels=augment_labels,
            **cond,
        )
        v = None
        if self.parameterization.learned_variance:
            _check(
                out.shape[1] == 2 * x.shape[1],
                "parameterization.learned_variance",
                True,
                f"needs model.out_channels = 2 x {x.shape[1]} data channels, "
                f"the network gives {out.shape[1]}",
            )
            out, v = out.chunk(2, dim=1)
            v = v.to(work)
        d = (c_skip * xw + c_out * out.to(work)).to(x.dtype)
        return d, v

    def with_end_vector(self, cond: dict[str, Tensor], end: Tensor) -> dict[str, Tensor]:
        """``cond`` with a flow map's second-time features after the condition's own vector
        (zeros for a dropped or absent one, as condition dropout trains it)."""
        own = getattr(self.net, "vector_dim", 0) - end.shape[1]
        vector = cond.get("cond_vector")
        if vector is None and own > 0:
            vector = end.new_zeros(end.shape[0], own)
        end = end if vector is None else torch.cat([vector.to(end), end], dim=1)
        return {**cond, "cond_vector": end}
