"""Sigma grids fitted to a model, a sampler and an NFE budget (LD3: Tong et al., ICLR 2025).

The grid is a softmax of free logits over the log-sigma increments between sigma_max and sigma_min
(so it is strictly decreasing for every parameter value) with the final 0 appended; with ``bounds``
two more increments let both end points move inside ``[bounds[0], bounds[1]]``. The objective is
LD3's (eq. 8, L2 distance): the sampler's output from the noise x_T' must match a high-NFE teacher's
solution from x_T, where x_T' may move inside a ball of radius ``radius * sigma_max * sqrt(d)``
around x_T (soft teacher forcing, per-sample and projected after each step). Gradients flow
through the sampler itself (samplers accept a grid of 0-d tensors), for every deterministic sampler.
The grid kept is the iterate (the initial grid included) with the lowest error on validation draws;
the error on held-out draws (other seeds) before and after is reported.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from diffusionlab.diffusion import discretizations
from diffusionlab.diffusion.samplers import Sampler, check_sigmas, get_sampler, steps_for_nfe

Denoise = Callable[[Tensor, Tensor], Tensor]


@dataclass
class GridFit:
    """A fitted grid (float64, ends at 0), the grid it started from, the mean L2 distance to the
    teacher on held-out draws before and after, and the settings that produced it."""

    sigmas: Tensor
    initial: Tensor
    heldout_before: float
    heldout_after: float
    settings: dict[str, Any]
    seconds: float
    history: list[float] = field(default_factory=list)


class MonotoneGrid(torch.nn.Module):
    """n strictly decreasing positive sigmas + 0 from free logits (softmax over log increments).

    Fixed ends: n - 1 increments span [log sigma_min, log sigma_max]. With ``bounds`` (lo, hi):
    n + 1 increments span [log lo, log hi], the first and last being the slack above sigma_0 and
    below sigma_{n-1}, so both ends are learned within the bounds."""

    def __init__(self, init: Tensor, bounds: tuple[float, float] | None = None) -> None:
        super().__init__()
        pos = init[:-1].to(torch.float64)
        if len(pos) < 2 and bounds is None:
            raise ValueError("a grid with fixed ends needs at least 2 positive sigmas to fit")
        self.learn_ends = bounds is not None
        lo, hi = (float(pos[-1]), float(pos[0])) if bounds is None else map(float, bounds)
        if not 0 < lo <= float(pos[-1]) <= float(pos[0]) <= hi or lo == hi:
            raise ValueError(f"the initial grid must lie within the bounds [{lo}, {hi}]")
        self.lo, self.hi, self.log_lo, self.log_hi = lo, hi, math.log(lo), math.log(hi)
        logs = pos.log()
        inc = -logs.diff()
        if self.learn_ends:
            span = self.log_hi - self.log_lo
            floor = 1e-3 * span  # an end point on its bound starts just inside it
            top = max(self.log_hi - float(logs[0]), floor)
            bottom = max(float(logs[-1]) - self.log_lo, floor)
            inc = torch.cat([inc.new_tensor([top]), inc, inc.new_tensor([bottom])])
        self.logits = torch.nn.Parameter(inc.log())

    def forward(self) -> Tensor:
        frac = torch.softmax(self.logits, 0).cumsum(0)
        sig = (self.log_hi - (self.log_hi - self.log_lo) * frac[:-1]).exp()
        if not self.learn_ends:  # the end points exactly
            sig = torch.cat([sig.new_tensor([self.hi]), sig, sig.new_tensor([self.lo])])
        return torch.cat([sig, sig.new_zeros(1)])


def _solve(
    sampler: Sampler, denoise: Denoise, noise: Tensor, sigmas: Tensor, batch_size: int
) -> Tensor:
    """The sampler's outputs from ``noise`` (already scaled to sigmas[0]) in batches."""
    return torch.cat([sampler(denoise, x, sigmas) for x in noise.split(batch_size)])


def _distance(a: Tensor, b: Tensor) -> float:
    """Mean over samples of the L2 distance ||a - b||."""
    return float((a - b).flatten(1).norm(dim=1).mean())


@dataclass(frozen=True)
class GridFitSettings:
    """How a grid is fitted; every field is stored with the grid (:meth:`record`).

    The teacher is ``teacher`` at ``teacher_nfe`` on the Karras grid. Noise draws: ``num_samples``
    to fit on, ``num_validation`` (default a quarter) to pick the iterate, ``num_heldout`` (default
    ``num_samples``) to report. ``init`` is a discretization name (``karras``, ``logsnr``,
    ``time_uniform`` with a schedule) or a grid ending at 0 with the sampler's number of steps,
    between ``sigma_min`` and ``sigma_max``; with ``bounds`` (lo, hi) both ends are learned within
    them. Adam with ``lr`` for ``steps`` steps over minibatches of ``batch_size`` (default all),
    LD3's soft teacher forcing with ``radius`` > 0; solves without gradients run
    ``eval_batch_size`` draws at a time, validation every ``eval_every`` steps."""

    teacher: str = "heun"
    teacher_nfe: int = 100
    num_samples: int = 256
    num_validation: int | None = None
    num_heldout: int | None = None
    init: str | Tensor = "karras"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    bounds: tuple[float, float] | None = None
    radius: float = 0.0
    steps: int = 200
    lr: float = 0.05
    batch_size: int | None = None
    eval_batch_size: int = 64
    eval_every: int = 10
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def resolved(self, start: Tensor) -> GridFitSettings:
        """The settings as run: the draw counts and batch size filled in, the ends of the grid
        actually started from, a given ``init`` grid recorded as ``given``."""
        return replace(
            self,
            num_validation=int(self.num_validation or max(self.num_samples // 4, 1)),
            num_heldout=int(self.num_heldout or self.num_samples),
            batch_size=int(self.batch_size or self.num_samples),
            init=self.init if isinstance(self.init, str) else "given",
            sigma_min=float(start[-2]),
            sigma_max=float(start[0]),
        )

    def record(self) -> dict[str, Any]:
        """Every field as a JSON value (``bounds`` a list, ``dtype`` its name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bounds"] = list(self.bounds) if self.bounds is not None else None
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out


def fit_discretization(
    denoise: Denoise,
    shape: Sequence[int],
    sampler: str | Sampler,
    nfe: int,
    settings: GridFitSettings | None = None,
    *,
    schedule: Any = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
    **changes: Any,
) -> GridFit:
    """Fit the sigma grid of ``sampler`` (name or :class:`Sampler`, deterministic) at ``nfe``
    network evaluations to a teacher solver, as ``settings`` say (with ``changes`` to its
    fields, e.g. ``steps=0``); ``schedule`` serves ``init="time_uniform"``.

    Noise x_T = sigma_max * z with z drawn from seeds ``seed`` (fit), ``seed + 1`` (validation,
    picks the iterate) and ``seed + 2`` (held-out, reported). The result's ``settings`` record is
    the sampler, its options, the NFE and :meth:`GridFitSettings.record` of the settings as run."""
    c = replace(settings or GridFitSettings(), **changes)
    smp = get_sampler(sampler) if isinstance(sampler, str) else sampler
    tch = get_sampler(c.teacher)
    for s, key in ((smp, "sampler"), (tch, "teacher")):
        if s.stochastic or s.adaptive:
            raise ValueError(f"{key} {s.name!r} must be a deterministic fixed-grid sampler")
    n = steps_for_nfe(smp.name, nfe, **smp.options)
    device = torch.device(device)
    if isinstance(c.init, str):
        start = discretizations.get_sigmas(
            c.init, n, schedule, sigma_min=c.sigma_min, sigma_max=c.sigma_max
        )
    else:
        start = torch.as_tensor(c.init, dtype=torch.float64).cpu()
        check_sigmas(start)
        if len(start) != n + 1:
            raise ValueError(f"init has {len(start) - 1} steps; {smp.name} at nfe={nfe} takes {n}")
    run = c.resolved(start)
    bounds, dtype = c.bounds, c.dtype
    grid = MonotoneGrid(start, bounds).to(device)
    s_max = float(start[0]) if bounds is None else float(bounds[1])
    t_grid = discretizations.karras(
        steps_for_nfe(tch.name, c.teacher_nfe, **tch.options),
        float(start[-2]) if bounds is None else float(bounds[0]),
        s_max,
    ).to(device=device, dtype=dtype)

    def draws(count: int, offset: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(c.seed + offset)
        z = torch.randn((count, *shape), generator=g, dtype=torch.float64).to(device, dtype)
        with torch.no_grad():
            target = _solve(tch, denoise, z * t_grid[0], t_grid, c.eval_batch_size)
        return z, target

    t0 = time.time()
    z_fit, y_fit = draws(c.num_samples, 0)
    z_val, y_val = draws(run.num_validation, 1)
    z_out, y_out = draws(run.num_heldout, 2)

    def error(sigmas: Tensor, z: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            sig = sigmas.detach().to(device=device, dtype=dtype)
            return _distance(_solve(smp, denoise, z * sig[0], sig, c.eval_batch_size), y)

    radius = c.radius
    offsets = torch.zeros_like(z_fit, requires_grad=radius > 0)
    ball = radius * s_max * math.sqrt(math.prod(shape))
    params = [grid.logits] + ([offsets] if radius > 0 else [])
    opt = torch.optim.Adam(params, lr=c.lr)
    best = start.clone()  # the starting grid itself is a candidate
    best_err = error(best, z_val, y_val)
    history = [best_err]
    order = torch.Generator().manual_seed(c.seed + 3)
    with warnings.catch_warnings():  # denoisers check sigma > 0 through float(): torch warns
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True")
        step = 0
        while step < c.steps:
            for idx in torch.randperm(c.num_samples, generator=order).split(run.batch_size):
                sigmas = grid()
                x_T = (z_fit[idx] * sigmas[0] + offsets[idx]).to(dtype)
                out = smp(denoise, x_T, sigmas.to(dtype))
                loss = (out - y_fit[idx]).pow(2).flatten(1).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if radius > 0:
                    with torch.no_grad():
                        norms = offsets.flatten(1).norm(dim=1).clamp_min(1e-30)
                        offsets.mul_((ball / norms).clamp(max=1.0).view(-1, *[1] * len(shape)))
                step += 1
                if step % c.eval_every == 0 or step == c.steps:
                    current = grid().detach().cpu()
                    err = error(current, z_val, y_val)
                    history.append(err)
                    if log is not None:
                        log(f"step {step}: validation distance {err:.5g} (best {best_err:.5g})")
                    if err < best_err and bool((current[:-1].diff() < 0).all()):
                        best, best_err = current, err
                if step == c.steps:
                    break
    record = {"sampler": smp.name, "options": dict(smp.options), "nfe": int(nfe), **run.record()}
    return GridFit(
        sigmas=best,
        initial=start,
        heldout_before=error(start, z_out, y_out),
        heldout_after=error(best, z_out, y_out),
        settings=record,
        seconds=time.time() - t0,
        history=history,
    )
