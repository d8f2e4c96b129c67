"""Skip optimizer steps whose loss or gradients are non-finite; stop a run that keeps making them."""

from __future__ import annotations

import lightning as L
import torch

from diffusionlab.errors import ConfigError, TrainingDiverged
from diffusionlab.training.log_steps import is_logging_step


class NonFiniteGuard(L.Callback):
    """Before each optimizer step: if any gradient holds NaN or inf (a non-finite loss makes them
    so), drop all gradients so the optimizer leaves weights and moments untouched (Adam skips
    parameters without a gradient; a zero gradient would still move them). Skipped steps are
    counted in ``train/nonfinite_steps`` (logged on logging steps); ``max_consecutive`` in a row raise
    :class:`TrainingDiverged` naming the likely causes.

    ``nan_to_num`` (``grad_nan_to_num``): repair the gradients instead, as EDM's training loop
    does (``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)``), and take the step; such steps are
    counted and stop the run in the same way. Lightning clips gradients after this hook, so
    ``trainer.gradient_clip_val`` sees the repaired gradients.

    Under DDP the gradients are already all-reduced here, so every rank skips the same steps."""

    def __init__(self, max_consecutive: int = 20, nan_to_num: bool = False) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"max_nonfinite_steps={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.nan_to_num = nan_to_num
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one fused norm per step: it is non-finite iff some gradient element is
        if (
            not params
            or torch.stack(torch._foreach_norm([p.grad for p in params])).isfinite().all()
        ):
            self.consecutive = 0
        else:
            for p in params:
                if self.nan_to_num:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
                else:
                    p.grad = None
            self.skipped += 1
            self.consecutive += 1
        if is_logging_step(trainer):
            pl_module.log("train/nonfinite_steps", float(self.skipped))
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(self.message(trainer, pl_module, optimizer))

    def message(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> str:
        hp = pl_module.hparams
        lr = optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"])
        return (
            f"{self.consecutive} consecutive steps with a non-finite loss or gradient "
            f"(step {trainer.global_step}, {self.skipped} {self._handled} in all; max_nonfinite_steps="
            f"{self.max_consecutive}). Likely causes: optimizer.lr={lr:g} too high; "
            f"trainer.precision={trainer.precision} overflowing (try 32-true or bf16-mixed); "
            f"the schedule/parameterization pair ({_name(hp.get('schedule'))} / "
            f"{_name(hp.get('parameterization'))}) at extreme sigmas; or NaN in the data"
        )

    @property
    def _handled(self) -> str:
        return "repaired (grad_nan_to_num)" if self.nan_to_num else "skipped"

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _name(cfg: dict | None) -> str:
    return str((cfg or {}).get("_target_", "?")).rsplit(".", 1)[-1]
