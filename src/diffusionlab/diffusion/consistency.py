"""Consistency-model objectives in sigma-space: iCT, ECT and consistency distillation.

A consistency model f (``parameterization=consistency``) maps every point x~ = x0 + sigma z of a
probability-flow ODE trajectory to the trajectory's end. All three losses compare f at two noise
levels r < t of one trajectory (Song et al. 2023, eq. 7 and 10),

    w(t, r) d( f(x_t; t), sg[f(x_r; r)] ),    x_t = x0 + t z,

with ``sg`` the stop-gradient of the same network (no EMA teacher: iCT sec. 3.2, also ECT and
sCM), run in training mode with the same per-sample dropout masks (iCT and ECT share the dropout
RNG between the two passes; here each sample's masks are fixed by its key and the layer,
networks/layers.py). f(x; sigma) = x for sigma <= sigma_min (the boundary condition, extended
below it): where r <= sigma_min the target is x_r itself (r = 0 gives x0, the diffusion loss).
They differ in the pair and in x_r:

- :class:`ICTLoss` (improved consistency training, Song & Dhariwal 2023): x_r = x0 + r z with the
  same z; (r, t) adjacent levels of a Karras grid whose size doubles on a curriculum; log-normal
  level probabilities; pseudo-Huber d; w = 1 / (t - r). From scratch.
- :class:`ECTLoss` (Easy Consistency Tuning, Geng et al. 2024): x_r = x0 + r z; t log-normal and
  r = t (1 - Delta(t)), the gap Delta shrinking by q every ``double_every`` steps; from a trained
  diffusion model (``init_ckpt=``), whose F the consistency parameterization shares.
- :class:`ConsistencyDistillationLoss` (Song et al. 2023, Alg. 2): x_r = one step of a trained
  teacher's PF-ODE from x_t at t to r, with any registered sampler.

Every random draw of a sample (its level and its noise) comes from its own stream of the batch's
generator (``CONSISTENCY_SIGMA_STREAM``, ``CONSISTENCY_NOISE_STREAM``), and the curriculum is a
function of the optimizer step the training module hands to :meth:`set_step`, so a step does not
depend on the batch split or world size and a resumed run replays the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.noise import Generator, randn_like
from diffusionlab.diffusion.noise_distributions import _draw
from diffusionlab.diffusion.parameterizations import Parameterization
from diffusionlab.diffusion.samplers import Sampler, get_sampler
from diffusionlab.diffusion.schedules import Schedule, _check
from diffusionlab.diffusion.seeds import CONSISTENCY_NOISE_STREAM, CONSISTENCY_SIGMA_STREAM
from diffusionlab.errors import ConfigError

# iCT sec. 3.3: c = 0.00054 sqrt(d) for data of dimension d
ICT_HUBER_FACTOR = 0.00054


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """sqrt(||diff||^2 + c^2) - c per sample (iCT eq. 5), the L2 norm when c = 0 (ECT's default,
    its "adaptive weighting"); the norm's gradient at 0 is taken as 0."""
    sq = diff.float().square().flatten(1).sum(1)
    if c > 0:
        return torch.sqrt(sq + c * c) - c
    return sq.clamp_min(1e-30).sqrt()


def huber_c(c: float | None, shape: tuple[int, ...]) -> float:
    """The pseudo-Huber constant: ``c``, or iCT's 0.00054 sqrt(d) when None (d = numel of a
    sample: 0.03 for CIFAR-10's 3 x 32 x 32)."""
    return ICT_HUBER_FACTOR * math.sqrt(math.prod(shape)) if c is None else float(c)


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023, eq. 8): N(k) = min(s0 2^floor(k /
    K'), s1) + 1 levels at step k, with K' = floor(K / (log2 floor(s1 / s0) + 1)) for K total
    steps: N doubles log2(s1 / s0) times and the last stage is as long as the others."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** min(int(step) // k_prime, 62), s1) + 1


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The ``n`` increasing levels sigma_1 = sigma_min < ... < sigma_n = sigma_max of EDM eq. 5
    (float64), iCT's discretisation."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_pair_probabilities(levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """p(i) for the pair (sigma_i, sigma_i+1), i = 1 .. N-1 (iCT eq. 9): proportional to
    erf((ln sigma_i+1 - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),
    the log-normal mass of the interval."""
    cdf = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


class ConsistencyObjective(nn.Module):
    """What every consistency objective shares: the schedule and parameterization, the boundary
    of f, the step interface of a curriculum (``losses.StepScheduled``) and each sample's own
    draws (its level and its noise)."""

    def __init__(self, schedule: Schedule, parameterization: Parameterization) -> None:
        super().__init__()
        self.schedule = schedule
        self.parameterization = parameterization
        # f(x; sigma) = x at and below this level (ConsistencyParam.training_boundary; 0 for a
        # plain denoiser, where only r = 0 takes the data itself)
        self.boundary = float(getattr(parameterization, "training_boundary", 0.0))
        self.step = 0

    def set_step(self, step: int) -> None:
        """The optimizer step the next batch belongs to (``losses.StepScheduled``)."""
        self.step = int(step)

    # ---------------------------------------------------------------- draws
    @staticmethod
    def uniform(n: int, generator: Generator, device: torch.device) -> Tensor:
        """``n`` float64 uniforms on [0, 1): each sample's own in ``CONSISTENCY_SIGMA_STREAM``."""
        if isinstance(generator, BatchedGenerator):
            return generator.uniform((1,), CONSISTENCY_SIGMA_STREAM)[:, 0].double().to(device)
        return _draw("rand", n, generator, device)

    @staticmethod
    def normal(n: int, generator: Generator, device: torch.device) -> Tensor:
        """``n`` float64 standard normals, each sample's own (``CONSISTENCY_SIGMA_STREAM``)."""
        if isinstance(generator, BatchedGenerator):
            return generator.normal((1,), CONSISTENCY_SIGMA_STREAM)[:, 0].double().to(device)
        return _draw("randn", n, generator, device)

    @staticmethod
    def noise(x0: Tensor, generator: Generator) -> Tensor:
        """The noise direction z shared by both points (``CONSISTENCY_NOISE_STREAM``)."""
        if isinstance(generator, BatchedGenerator):
            return generator.normal(x0.shape[1:], CONSISTENCY_NOISE_STREAM).to(x0)
        return randn_like(x0, generator)


class ConsistencyLoss(ConsistencyObjective):
    """What the three discrete losses share: the target with its boundary, the pseudo-Huber
    distance and the 1 / (t - r) weight. Subclasses give the pair (:meth:`pair`) and, for
    distillation, x_r (:meth:`point_at`).

    ``huber_c``: the pseudo-Huber constant (None: iCT's 0.00054 sqrt(d); 0: the L2 norm)."""

    def __init__(
        self, schedule: Schedule, parameterization: Parameterization, huber_c: float | None
    ) -> None:
        super().__init__(schedule, parameterization)
        _check(huber_c is None or huber_c >= 0, "huber_c", huber_c, "must be >= 0 or null")
        self.huber_c = huber_c

    # ---------------------------------------------------------------- the objective
    def pair(self, n: int, generator: Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(t, r)``, float32 ``[n]`` each, 0 <= r < t."""
        raise NotImplementedError

    def point_at(
        self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, r: Tensor, **kw: Any
    ) -> Tensor:
        """x_r on the trajectory through x_t: x0 + r z (consistency training)."""
        return x0 + _col(r, x0) * z

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        generator: Generator = None,
        cond: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(per-sample loss ``[B]``, t ``[B]``), float32 whatever ``x0``'s dtype. ``cond``:
        further network inputs (a text or image condition, ``networks/context.py``), the same
        (dropped or not) at both points."""
        t, r = self.pair(x0.shape[0], generator, x0.device)
        x0_32 = x0.float()
        z = self.noise(x0_32, generator)
        x_t = x0_32 + _col(t, x0) * z
        cond = {"class_labels": class_labels, "augment_labels": augment_labels, **(cond or {})}
        with torch.no_grad():
            x_r = self.point_at(x0_32, z, x_t, t, r, generator=generator, **cond)
            # the network never sees r <= boundary (log 0 at r = 0): those rows take x_r
            inside = r > self.boundary
            r_eval = torch.where(inside, r, t)
            f_r = denoiser(x_r.to(x0.dtype), r_eval, **cond).float()
            target = torch.where(_col(inside, x0), f_r, x_r)
        f_t = denoiser(x_t.to(x0.dtype), t, **cond)
        c = huber_c(self.huber_c, tuple(x0.shape[1:]))
        return pseudo_huber(f_t.float() - target, c) * self.weight(t, r), t

    def weight(self, t: Tensor, r: Tensor) -> Tensor:
        """w(t, r) = 1 / (t - r) (iCT sec. 3.5)."""
        return 1 / (t - r)

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization}, huber_c={self.huber_c}"


def _col(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample ``[B]`` value as a column broadcastable against ``x``."""
    return v.view(-1, *([1] * (x.ndim - 1)))


class ICTLoss(ConsistencyLoss):
    """Improved consistency training (Song & Dhariwal 2023), from scratch, no teacher.

    At step k the grid has N(k) Karras levels (rho = 7, EDM's sigma_min .. sigma_max; the
    curriculum :func:`ict_num_levels`, s0 = 10, s1 = 1280 over ``total_steps`` = K); each sample
    draws the pair (sigma_i, sigma_i+1) with the log-normal probabilities of eq. 9 (P_mean =
    -1.1, P_std = 2.0), noises x0 with one z at both levels and pays
    d(f(x0 + sigma_i+1 z), sg f(x0 + sigma_i z)) / (sigma_i+1 - sigma_i), d pseudo-Huber with
    c = 0.00054 sqrt(d) (sec. 3.3-3.5). ``total_steps`` should be the run's
    ``trainer.max_steps`` (the presets interpolate it)."""

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        total_steps: int = 400_000,
        s0: int = 10,
        s1: int = 1280,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        super().__init__(schedule, parameterization, huber_c)
        _check(int(total_steps) >= 1, "total_steps", total_steps, "must be >= 1")
        _check(1 <= int(s0) <= int(s1), "s0", s0, f"need 1 <= s0 <= s1 = {s1}")
        _check(p_std > 0, "p_std", p_std, "must be > 0")
        self.total_steps, self.s0, self.s1 = int(total_steps), int(s0), int(s1)
        self.rho, self.p_mean, self.p_std = float(rho), float(p_mean), float(p_std)
        self.sigma_min = float(schedule.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(schedule.sigma_max if sigma_max is None else sigma_max)
        _check(
            0 < self.sigma_min < self.sigma_max,
            "sigma_min",
            self.sigma_min,
            f"need 0 < sigma_min < sigma_max = {self.sigma_max}",
        )
        self._tables: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def num_levels(self) -> int:
        """N at the current step."""
        return ict_num_levels(self.step, self.total_steps, self.s0, self.s1)

    def _table(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(levels, cumulative pair probabilities) for N = ``n`` on ``device`` (cached)."""
        key = (n, str(device))
        if key not in self._tables:
            levels = karras_levels(n, self.sigma_min, self.sigma_max, self.rho)
            cdf = ict_pair_probabilities(levels, self.p_mean, self.p_std).cumsum(0)
            self._tables[key] = (levels.to(device), cdf.to(device))
        return self._tables[key]

    def pair(self, n: int, generator: Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        levels, cdf = self._table(self.num_levels(), device)
        u = self.uniform(n, generator, device)
        i = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(len(levels) - 2)
        return levels[i + 1].float(), levels[i].float()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, s0={self.s0}, "
            f"s1={self.s1}, p_mean={self.p_mean}, p_std={self.p_std}"
        )


class GapSchedule:
    """ECT's mapping from t to r = t (1 - Delta) (Geng et al. 2024, sec. 3; locuslab/ect
    ``ECMLoss``): at stage s = floor(step / double_every), Delta = q^-(s+1) (1 + k sigmoid(-b t))
    (``sigmoid``, the paper's) or q^-(s+1) (``const``); r is clipped at 0 (a pure diffusion
    target where Delta >= 1). q = 2, k = 8, b = 1; CIFAR-10 halves the gap every 25k of 200k
    steps at batch 128 (``double=250`` ticks of 12.8 kimg)."""

    MAPPINGS = ("sigmoid", "const")

    def __init__(
        self,
        q: float = 2.0,
        double_every: int = 25_000,
        k: float = 8.0,
        b: float = 1.0,
        mapping: str = "sigmoid",
    ) -> None:
        _check(q > 1, "q", q, "must be > 1 (the gap shrinks by q per stage)")
        _check(int(double_every) >= 1, "double_every", double_every, "must be >= 1")
        _check(mapping in self.MAPPINGS, "mapping", mapping, f"valid: {list(self.MAPPINGS)}")
        self.q, self.double_every = float(q), int(double_every)
        self.k, self.b, self.mapping = float(k), float(b), mapping

    def stage(self, step: int) -> int:
        return int(step) // self.double_every

    def decay(self, step: int) -> float:
        """q^-(stage + 1)."""
        return self.q ** -(min(self.stage(step), 1000) + 1)

    def r(self, t: Tensor, step: int) -> Tensor:
        """r for each t at ``step`` (same dtype as t)."""
        delta = self.decay(step) * torch.ones_like(t)
        if self.mapping == "sigmoid":
            delta = delta * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - delta)).clamp_min(0)

    def __repr__(self) -> str:
        return (
            f"GapSchedule(q={self.q:g}, double_every={self.double_every}, k={self.k:g}, "
            f"b={self.b:g}, mapping={self.mapping!r})"
        )


class ECTLoss(ConsistencyLoss):
    """Easy Consistency Tuning (Geng et al. 2024): consistency training that starts from a trained
    diffusion model (``init_ckpt=``) and shrinks the gap between the two levels on a schedule.

    ln t ~ N(P_mean, P_std^2) (P_mean = -1.1, P_std = 2.0), r = t (1 - Delta(t)) from
    :class:`GapSchedule` (q = 2, k = 8, b = 1, sigmoid), x_r = x0 + r z with the x_t's z, and
    w(t, r) d(f(x_t), sg f(x_r)) with d the L2 norm (``huber_c = 0``: ECT's "adaptive weighting",
    p = 1/2; c > 0 its pseudo-Huber variant) and ``weighting``: ``inv_gap`` w = 1 / (t - r)
    (locuslab/ect ``ECMLoss`` of its CIFAR-10 branch ``main``, iCT's weight; the default),
    ``snr_plus_k`` w = 1 / t^2 + 1 / sigma_data^2 (its ImageNet branch ``imgnet``,
    ``snrplusk_wt``) or ``none`` (w = 1). At the first stage Delta > 1 for small t, so
    r = 0 and the target is x0: the tuning begins as the diffusion loss it starts from. t is held
    at the boundary (sigma_min) from below."""

    WEIGHTINGS = ("inv_gap", "snr_plus_k", "none")

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        gap: GapSchedule | Mapping[str, Any] | None = None,
        huber_c: float | None = 0.0,
        weighting: str = "inv_gap",
    ) -> None:
        super().__init__(schedule, parameterization, huber_c)
        _check(p_std > 0, "p_std", p_std, "must be > 0")
        _check(weighting in self.WEIGHTINGS, "weighting", weighting, f"valid: {self.WEIGHTINGS}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.gap = gap if isinstance(gap, GapSchedule) else GapSchedule(**dict(gap or {}))
        self.weighting = weighting
        self.sigma_data = float(getattr(parameterization, "sigma_data", 0.5))

    def weight(self, t: Tensor, r: Tensor) -> Tensor:
        if self.weighting == "snr_plus_k":
            return 1 / t**2 + 1 / self.sigma_data**2
        if self.weighting == "inv_gap":
            return 1 / (t - r)
        return torch.ones_like(t)

    def draw_t(self, n: int, generator: Generator, device: torch.device) -> Tensor:
        """Log-normal t (float64), held at the boundary from below."""
        t = torch.exp(self.p_mean + self.p_std * self.normal(n, generator, device))
        return t.clamp_min(self.boundary) if self.boundary > 0 else t

    def pair(self, n: int, generator: Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        t = self.draw_t(n, generator, device)
        return t.float(), self.gap.r(t, self.step).float()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, p_mean={self.p_mean}, p_std={self.p_std}, {self.gap}, "
            f"weighting={self.weighting!r}"
        )


class TeacherSlot:
    """A frozen diffusion teacher of a distillation loss (``loss=cd``, ``loss=scm`` with
    ``tangent=teacher``, ``loss=meanflow`` with ``velocity=teacher``). The training app reads it
    from ``teacher_ckpt`` (or the run's ``init_ckpt``: the student starts from its teacher) and
    hands it over with :meth:`set_teacher`; it is not a submodule (not in the state dict, not
    trained), so a resumed run reads it again."""

    config_name: str  # the ``loss=`` choice, for messages
    teacher_ckpt: str | None = None

    @property
    def needs_teacher(self) -> bool:
        """Whether this loss reads a teacher (the training app attaches one when so)."""
        return True

    def set_teacher(self, teacher: nn.Module) -> None:
        """The teacher denoiser ``D(x, sigma, class_labels=...)`` (frozen, in eval mode)."""
        self.__dict__["_teacher"] = teacher.eval().requires_grad_(False)

    @property
    def teacher(self) -> nn.Module | None:
        return self.__dict__.get("_teacher")

    def teacher_on(self, device: torch.device) -> nn.Module:
        """The teacher on ``device``; a clear error when none was attached."""
        teacher = self.teacher
        if teacher is None:
            raise ConfigError(
                f"loss={self.config_name} needs its teacher: loss.teacher_ckpt=<checkpoint> or "
                "init_ckpt=<teacher>"
            )
        param = next(teacher.parameters(), None)
        if param is not None and param.device != device:
            teacher.to(device)
        return teacher


class ConsistencyDistillationLoss(ECTLoss, TeacherSlot):
    """Consistency distillation (Song et al. 2023, Alg. 2) from a trained diffusion teacher, whose
    PF-ODE step from t to r is taken by any registered sampler (``teacher_sampler``: EDM's Heun,
    the paper's choice, by default).

    Pairs: ln t ~ N(P_mean, P_std^2) and r = t (1 - q^-(stage+1)) (ECT's constant mapping, the
    continuous form of the paper's N-level grid; the gap shrinks by q every ``double_every``
    steps). Because r / t is one number for the batch, one sampler run moves every sample: the
    PF-ODE dx/dsigma = (x - D(x; sigma)) / sigma keeps its form under x -> k x, sigma -> k sigma,
    so sample i runs on the common grid [1, r / t] with D_i(y; s) = D(t_i y; t_i s) / t_i and
    x_r = t_i y. The target network is sg(f) (not the paper's EMA teacher, mu = 0.95 for
    CIFAR-10: iCT and ECT drop it); d pseudo-Huber (``huber_c``; None: iCT's constant). The
    teacher: :class:`TeacherSlot`."""

    config_name = "cd"

    def __init__(
        self,
        schedule: Schedule,
        parameterization: Parameterization,
        teacher_ckpt: str | None = None,
        teacher_sampler: Mapping[str, Any] | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        gap: GapSchedule | Mapping[str, Any] | None = None,
        huber_c: float | None = None,
        weighting: str = "inv_gap",
    ) -> None:
        gap = dict(gap or {}) if not isinstance(gap, GapSchedule) else gap
        if isinstance(gap, dict):
            _check(
                gap.setdefault("mapping", "const") == "const",
                "gap.mapping",
                gap["mapping"],
                "distillation needs the const mapping (one ratio r / t per step)",
            )
        super().__init__(schedule, parameterization, p_mean, p_std, gap, huber_c, weighting)
        spec = dict(teacher_sampler or {"name": "heun"})
        try:
            self.teacher_sampler: Sampler = get_sampler(
                str(spec.get("name", "heun")), **dict(spec.get("options") or {})
            )
            self.teacher_sampler.steps(lambda x, s: x, torch.ones(1, 1), [1.0, 0.5])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"loss.teacher_sampler: {e}") from None
        self.teacher_ckpt = None if teacher_ckpt is None else str(teacher_ckpt)

    def point_at(
        self,
        x0: Tensor,
        z: Tensor,
        x_t: Tensor,
        t: Tensor,
        r: Tensor,
        generator: Generator = None,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """x_r = the teacher sampler's step from (x_t, t) to r, by scale invariance; the teacher
        reads the student's class labels and text or image condition (not the augmentation)."""
        teacher = self.teacher_on(x_t.device)
        ratio = 1.0 - self.gap.decay(self.step)  # r / t, one number for the whole batch
        k = _col(t, x_t)

        def scaled(y: Tensor, s: Tensor) -> Tensor:
            # D_i(y; s) = D(t_i y; t_i s) / t_i: the same PF-ODE in units of t_i
            return teacher(k * y, t * s, class_labels=class_labels, **cond).float() / k

        y = self.teacher_sampler.steps(scaled, x_t / k, [1.0, ratio], generator=generator)
        return k * y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, teacher_sampler={self.teacher_sampler}"
