"""Learning-rate schedules: the factor the optimizer's ``lr`` is multiplied by at each optimizer step.

Each schedule is a picklable callable ``factor(step) -> float`` for
``torch.optim.lr_scheduler.LambdaLR``, stepped once per optimizer step (Lightning
``interval: step``): the update of optimizer step ``k`` (0-based, ``trainer.global_step`` before
it) uses ``lr * factor(k)``. ``LambdaLR`` keeps ``k`` (``last_epoch``) and the schedule's fields in
its state dict, so a resumed run continues the same curve.

All three share one linear warm-up over ``warmup_steps`` (EDM's ``lr_rampup_kimg``, in optimizer
steps = images / global batch): ``min(1, (k + 1) / warmup_steps)``; 0 = none. ``rampup_steps``,
its name in checkpoints written before warm-up was spelled one way, is read as ``warmup_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class

from diffusionlab.errors import ConfigError


class Constant:
    """``lr`` after the warm-up (EDM, Karras et al. 2022, training_loop: lr * min(t / rampup, 1))."""

    def __init__(self, warmup_steps: int = 0, rampup_steps: int | None = None) -> None:
        warmup_steps = warmup_steps if rampup_steps is None else rampup_steps
        if warmup_steps < 0:
            raise ConfigError(f"lr_schedule.warmup_steps={warmup_steps} must be >= 0")
        self.warmup_steps = int(warmup_steps)

    def warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def __call__(self, step: int) -> float:
        return self.warmup(step)


class InverseSqrt(Constant):
    """EDM2's decay (Karras et al. 2024, eq. 18; NVlabs/edm2 ``learning_rate_schedule``):
    ``lr / sqrt(max(t / ref_batches, 1))`` with ``t`` the batches trained before this step
    (``cur_nimg / batch_size`` there; ``t = step`` here), times the warm-up."""

    def __init__(
        self, ref_batches: int, warmup_steps: int = 0, rampup_steps: int | None = None
    ) -> None:
        super().__init__(warmup_steps, rampup_steps)
        if ref_batches <= 0:
            raise ConfigError(f"lr_schedule.ref_batches={ref_batches} must be > 0")
        self.ref_batches = int(ref_batches)

    def __call__(self, step: int) -> float:
        return self.warmup(step) / math.sqrt(max(step / self.ref_batches, 1.0))


class Cosine(Constant):
    """Half-cosine from ``lr`` down to ``final_ratio * lr`` between the end of the warm-up and
    ``total_steps`` (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts); flat after."""

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int = 0,
        final_ratio: float = 0.0,
        rampup_steps: int | None = None,
    ) -> None:
        super().__init__(warmup_steps, rampup_steps)
        if total_steps <= self.warmup_steps:
            raise ConfigError(
                f"lr_schedule.total_steps={total_steps} must exceed lr_schedule.warmup_steps="
                f"{self.warmup_steps} (it follows trainer.max_steps, which must be > 0 for cosine)"
            )
        if not 0.0 <= final_ratio <= 1.0:
            raise ConfigError(f"lr_schedule.final_ratio={final_ratio} must be in [0, 1]")
        self.total_steps = int(total_steps)
        self.final_ratio = float(final_ratio)

    def __call__(self, step: int) -> float:
        progress = min(
            max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0), 1
        )
        cosine = self.final_ratio + (1 - self.final_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
        return self.warmup(step) * cosine


def build_lr_schedule(cfg: Mapping[str, Any] | None, warmup_steps: int = 0) -> Constant:
    """The schedule of an ``lr_schedule`` config (``_target_`` + arguments); ``None`` (checkpoints
    from before ``lr_schedule=``) is the constant schedule with ``warmup_steps``. Built without
    Hydra's ``instantiate`` so a bad value stops with its own :class:`ConfigError`."""
    if not cfg:
        return Constant(max(int(warmup_steps), 0))
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    return get_class(cfg["_target_"])(**kwargs)
