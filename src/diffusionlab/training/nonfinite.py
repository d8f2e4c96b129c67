"""Skip optimizer steps whose loss or gradients are non-finite; stop a run that keeps making them."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from diffusionlab.errors import ConfigError, TrainingDiverged
from diffusionlab.training.log_steps import is_logging_step


class NonFiniteGuard(L.Callback):
    """Before each optimizer step: if any gradient holds NaN or inf (a non-finite loss makes them
    so), the optimizer leaves weights and moments untouched. Skipped steps are counted in
    ``train/nonfinite_steps`` (logged on logging steps); ``max_consecutive`` in a row raise
    :class:`TrainingDiverged` naming the likely causes.

    ``nan_to_num`` (``grad_nan_to_num``): repair the gradients instead, as EDM's training loop
    does (``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)`` on every gradient, every step), and
    take the step; such steps are counted and stop the run in the same way. Lightning clips
    gradients after this hook, so ``trainer.gradient_clip_val`` sees the repaired gradients.

    Nothing waits for the device: the check (one ``foreach`` norm) and the counters stay on it,
    and a fused optimizer (the default Adam/AdamW) skips the step itself through its
    ``found_inf`` input, as under loss scaling. Another optimizer has no such input: there the
    decision is read back every step and the gradients dropped (Adam skips parameters without a
    gradient; a zero gradient would still move them). The counters are read on logging steps
    and every ``max_consecutive`` steps, so a diverged run stops at most ``max_consecutive - 1``
    steps after its limit, reporting the count it then has.

    Under DDP the gradients are already all-reduced here, so every rank skips the same steps."""

    def __init__(self, max_consecutive: int = 20, nan_to_num: bool = False) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"max_nonfinite_steps={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.nan_to_num = nan_to_num
        # (skipped, consecutive): int64 on the training device once a step ran
        self._counts: Tensor = torch.zeros(2, dtype=torch.int64)

    @property
    def skipped(self) -> int:
        """Steps skipped (or repaired) so far (reads the device counter)."""
        return int(self._counts[0])

    @property
    def consecutive(self) -> int:
        """Non-finite steps in a row up to the last one (reads the device counter)."""
        return int(self._counts[1])

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            grads = [p.grad for p in params]
            # one fused norm per step: it is non-finite iff some gradient element is
            bad = ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
            self._count(bad)
            if self.nan_to_num:
                for g in grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
            elif _takes_found_inf(optimizer):
                optimizer.found_inf = bad.float()
            elif bad:  # no device-side skip in this optimizer: one read per step
                for p in params:
                    p.grad = None
        step = trainer.global_step + 1
        logging = is_logging_step(trainer)
        if logging or step % self.max_consecutive == 0:
            skipped, consecutive = self._counts.tolist()
            if logging:
                pl_module.log("train/nonfinite_steps", float(skipped))
            if consecutive >= self.max_consecutive:
                raise TrainingDiverged(self.message(trainer, pl_module, optimizer))

    def _count(self, bad: Tensor) -> None:
        """skipped += bad; consecutive = (consecutive + 1) if bad else 0, on the device."""
        counts = self._counts.to(bad.device, non_blocking=True)
        bad = bad.long()
        self._counts = torch.stack([counts[0] + bad, (counts[1] + 1) * bad])

    def message(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> str:
        hp = pl_module.hparams
        lr = optimizer.defaults.get("lr", optimizer.param_groups[0]["lr"])
        skipped, consecutive = self._counts.tolist()
        return (
            f"{consecutive} consecutive steps with a non-finite loss or gradient "
            f"(step {trainer.global_step}, {skipped} {self._handled} in all; max_nonfinite_steps="
            f"{self.max_consecutive}). Likely causes: optimizer.lr={lr:g} too high; "
            f"trainer.precision={trainer.precision} overflowing (try 32-true or bf16-mixed); "
            f"the schedule/parameterization pair ({_name(hp.get('schedule'))} / "
            f"{_name(hp.get('parameterization'))}) at extreme sigmas; or NaN in the data"
        )

    @property
    def _handled(self) -> str:
        return "repaired (grad_nan_to_num)" if self.nan_to_num else "skipped"

    def state_dict(self) -> dict[str, int]:
        skipped, consecutive = self._counts.tolist()
        return {"skipped": skipped, "consecutive": consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        counts = [int(state_dict.get("skipped", 0)), int(state_dict.get("consecutive", 0))]
        self._counts = torch.tensor(counts, dtype=torch.int64)


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` skips itself on ``optimizer.found_inf`` (torch's fused kernels,
    the interface ``GradScaler`` uses)."""
    fused = all(g.get("fused") for g in optimizer.param_groups)
    return fused and getattr(optimizer, "_step_supports_amp_scaling", False)


def _name(cfg: dict | None) -> str:
    return str((cfg or {}).get("_target_", "?")).rsplit(".", 1)[-1]
