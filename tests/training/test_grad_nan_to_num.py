"""``grad_nan_to_num``: non-finite gradient elements are replaced as in EDM (NaN -> 0,
+-inf -> +-1e5) before clipping and the step, instead of the step being skipped."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from app.helpers import compose_train, fast_overrides
from diffusionlab.cli.train import train
from diffusionlab.errors import TrainingDiverged
from diffusionlab.training.nonfinite import NonFiniteGuard


def _optimizer(grad: torch.Tensor) -> SimpleNamespace:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    return SimpleNamespace(param_groups=[{"params": [p]}])


# a trainer on a step that does not log (step 1 of 10, trainer.log_every_n_steps not due)
NOT_LOGGING = SimpleNamespace(
    max_steps=10, global_step=0, _logger_connector=SimpleNamespace(should_update_logs=False)
)


def test_guard_repairs_elements_or_drops_the_gradients():
    grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])
    opt = _optimizer(grad)
    guard = NonFiniteGuard(max_consecutive=5, nan_to_num=True)
    guard.on_before_optimizer_step(NOT_LOGGING, None, opt)
    assert opt.param_groups[0]["params"][0].grad.tolist() == [0.0, 1e5, -1e5, 0.5]
    assert (guard.skipped, guard.consecutive) == (1, 1)
    opt = _optimizer(grad)
    NonFiniteGuard(max_consecutive=5).on_before_optimizer_step(NOT_LOGGING, None, opt)
    assert opt.param_groups[0]["params"][0].grad is None


class InjectInf(L.Callback):
    """Test-only: +inf in the first gradient element of the first parameter on optimizer step
    ``step``; records that parameter's first element before and after the step."""

    seen: dict[str, float] = {}

    def __init__(self, step: int) -> None:
        self.step = step

    def _first(self, pl_module: L.LightningModule) -> torch.nn.Parameter:
        return next(p for p in pl_module.denoiser.parameters() if p.requires_grad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            p = self._first(pl_module)
            p.grad.view(-1)[0] = float("inf")
            InjectInf.seen["before"] = float(p.detach().view(-1)[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            InjectInf.seen["after"] = float(self._first(pl_module).detach().view(-1)[0])


def test_repaired_gradient_is_clipped_and_applied(tmp_path):
    # SGD with lr 0.01 and clipping at norm 1: the +inf element becomes 1e5, which dominates the
    # gradient norm, so after clipping it is ~1 and its weight moves by ~-0.01. Were the gradient
    # clipped before the repair, the inf norm would make it NaN (0 * inf).
    args = [*fast_overrides(tmp_path), "grad_nan_to_num=true", "trainer.gradient_clip_val=1.0"]
    args += ["optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps"]
    args += ["optimizer.lr=0.01", "lr_warmup_steps=0", "trainer.max_steps=3"]
    args += ["+callbacks.inject={_target_:test_grad_nan_to_num.InjectInf,step:1}"]
    InjectInf.seen.clear()
    train(compose_train(args, tmp_path))
    delta = InjectInf.seen["after"] - InjectInf.seen["before"]
    assert delta == pytest.approx(-0.01, rel=1e-3)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    counts = [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")]
    assert counts == [0.0, 1.0, 1.0]


def test_repaired_steps_still_stop_a_diverged_run(tmp_path):
    poison = "+callbacks.poison={_target_:app.poison.PoisonBatches,steps:[]}"
    args = [*fast_overrides(tmp_path), "grad_nan_to_num=true", "max_nonfinite_steps=2", poison]
    with pytest.raises(TrainingDiverged, match=r"2 repaired \(grad_nan_to_num\) in all"):
        train(compose_train(args, tmp_path))
