"""Speed settings that do not change the math: torch.compile of the network, channels_last
memory format, fused/foreach optimizer kernels, and the precision check for the trainer."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)

HALF_PRECISIONS = ("16", "16-mixed", "16-true")
FUSED_ON_CPU = ("Adam", "AdamW", "SGD", "Adagrad")


def check_precision(precision: str | int, accelerator: str) -> None:
    """float16 (with loss scaling) needs CUDA; Lightning has no float16 autocast on CPU."""
    on_cuda = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if str(precision) in HALF_PRECISIONS and not on_cuda:
        raise ConfigError(
            f"trainer.precision={precision} needs a CUDA GPU (trainer.accelerator={accelerator}); "
            "on CPU use trainer.precision=bf16-mixed or 32-true"
        )


def compile_network(net: nn.Module, **options: Any) -> None:
    """``torch.compile`` the network's forward in place (``state_dict`` keys unchanged).

    If compiling fails at a call, one warning naming ``compile`` is logged and the network runs
    eagerly from then on. The compiled forward belongs to this instance: copy a network (e.g.
    ``copy.deepcopy``) before compiling it, not after."""
    eager = net.forward
    current: list[Callable[..., Any]] = [torch.compile(eager, **options)]

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if current[0] is eager:
            return eager(*args, **kwargs)
        try:
            return current[0](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning(
                "compile=true: torch.compile of %s failed (%s: %s); running it eagerly",
                type(net).__name__,
                type(e).__name__,
                first[:200],
            )
            current[0] = eager
            return eager(*args, **kwargs)

    net.forward = forward


def to_channels_last(net: nn.Module) -> nn.Module:
    """Store 4-D weights as NHWC; convolutions then run channels_last whatever the input layout."""
    return net.to(memory_format=torch.channels_last)


class CompileNetwork(L.Callback):
    """``compile=true``: compile the network when fitting starts, inside each training process
    (a compiled network cannot be pickled to ``ddp_spawn`` workers)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compile_network(pl_module.denoiser.net)


def fast_optimizer_options(
    factory: Callable[..., torch.optim.Optimizer],
    params: Iterable[torch.Tensor],
    allow_fused: bool = True,
) -> dict[str, bool]:
    """Kernel options for the optimizer: ``fused=True`` when all parameters sit on one device type
    with a fused kernel for it (CUDA; the CPU for Adam/AdamW/SGD/Adagrad, torch >= 2.4), else
    ``foreach=True`` where accepted. ``allow_fused=False`` where the caller cannot use a fused
    step (Lightning refuses gradient clipping with a fused optimizer under mixed precision).
    Options the user set (``optimizer.fused`` / ``optimizer.foreach``) are left alone."""
    keywords = getattr(factory, "keywords", None) or {}
    if "fused" in keywords or "foreach" in keywords:
        return {}
    cls = getattr(factory, "func", factory)
    accepted = inspect.signature(cls).parameters
    fused_on = {"cuda", "cpu"} if cls.__name__ in FUSED_ON_CPU else {"cuda"}
    devices = {p.device.type for p in params}
    if allow_fused and "fused" in accepted and len(devices) == 1 and devices <= fused_on:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}
