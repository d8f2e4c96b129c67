"""The non-finite guard decides on the device: a fused optimizer skips the step through its
``found_inf`` input (weights, moments and step count bitwise untouched), counters stay on the
device and are read only on logging steps and every ``max_consecutive`` steps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusionlab.errors import TrainingDiverged
from diffusionlab.training.nonfinite import NonFiniteGuard


class Reads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.startswith("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


def trainer(step: int, logging: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        max_steps=1000,
        global_step=step,
        precision="32-true",
        _logger_connector=SimpleNamespace(should_update_logs=logging),
    )


MODULE = SimpleNamespace(hparams={}, log=lambda *a, **k: None)


def _setup(fused: bool) -> tuple[torch.nn.Linear, torch.optim.Adam]:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused, foreach=None if fused else True)
    return net, opt


def _backward(net: torch.nn.Linear, poison: bool) -> None:
    net.zero_grad()
    loss = net(torch.ones(2, 4)).square().mean()
    (loss * (float("nan") if poison else 1.0)).backward()


def _state(net, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in net.parameters()]
    for s in opt.state.values():
        out += [s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone()]
    return out


def test_fused_step_is_skipped_on_the_device_without_reading_back():
    net, opt = _setup(fused=True)
    guard = NonFiniteGuard(max_consecutive=5)
    _backward(net, poison=False)
    guard.on_before_optimizer_step(trainer(0), MODULE, opt)
    opt.step()  # the moments exist from here on
    for step, poison in enumerate([True, False], start=1):
        _backward(net, poison)
        before = _state(net, opt)
        with Reads() as reads:
            guard.on_before_optimizer_step(trainer(step), MODULE, opt)
            opt.step()
        assert reads.n == 0  # steps 2 and 3: no logging steps, not multiples of 5
        after = _state(net, opt)
        changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
        assert all(changed) != poison and any(changed) != poison
    assert (guard.skipped, guard.consecutive) == (1, 0)
    assert float(opt.state[net.weight]["step"]) == 2.0  # two real updates


def test_nan_to_num_repairs_on_the_device_and_counts():
    net, opt = _setup(fused=True)
    guard = NonFiniteGuard(max_consecutive=5, nan_to_num=True)
    net.weight.grad = torch.full((3, 4), float("inf"))
    net.bias.grad = torch.tensor([float("nan"), -float("inf"), 0.5])
    with Reads() as reads:
        guard.on_before_optimizer_step(trainer(0), MODULE, opt)
    assert reads.n == 0 and not hasattr(opt, "found_inf")
    assert net.bias.grad.tolist() == [0.0, -1e5, 0.5] and bool((net.weight.grad == 1e5).all())
    assert (guard.skipped, guard.consecutive) == (1, 1)


def test_counters_are_read_on_logging_steps_and_every_max_consecutive_steps():
    """A run that keeps failing stops at the first read after reaching the limit: here the read
    every 3 steps (step 3), with the count it then has."""
    net, opt = _setup(fused=True)
    guard = NonFiniteGuard(max_consecutive=3)
    logged = []
    module = SimpleNamespace(hparams={}, log=lambda name, value: logged.append(value))
    for step in range(2):
        _backward(net, poison=True)
        guard.on_before_optimizer_step(trainer(step, logging=step == 0), module, opt)
    assert logged == [1.0]
    _backward(net, poison=True)
    with pytest.raises(TrainingDiverged, match=r"^3 consecutive steps .*\(step 2, 3 skipped"):
        guard.on_before_optimizer_step(trainer(2), module, opt)


def test_other_optimizers_drop_the_gradients():
    """foreach Adam has no found_inf input: the guard reads its decision and drops the grads."""
    net, opt = _setup(fused=False)
    guard = NonFiniteGuard(max_consecutive=5)
    _backward(net, poison=True)
    guard.on_before_optimizer_step(trainer(0), MODULE, opt)
    assert net.weight.grad is None and not hasattr(opt, "found_inf")


def test_state_round_trip():
    guard = NonFiniteGuard()
    guard.load_state_dict({"skipped": 4, "consecutive": 2})
    assert guard.state_dict() == {"skipped": 4, "consecutive": 2}
    assert (guard.skipped, guard.consecutive) == (4, 2)
