"""One training step of a DiffusionModule on synthetic batches: the measured unit of the
throughput benchmarks (network, loss, backward, gradient clipping, optimizer, EMA; no data
loading, no Lightning). Also FLOPs per step and model FLOP utilisation (MFU)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from benchlib import compose_train, sync
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from diffusionlab.training.ema import ema_update
from diffusionlab.training.module import DiffusionModule
from diffusionlab.training.performance import (
    compile_network,
    fast_optimizer_options,
    to_channels_last,
)

# Dense peak TFLOP/s per GPU name fragment: (bf16/fp16 tensor cores, tf32, fp32 non-tensor).
PEAK_TFLOPS = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 181.0, 91.6),
    "A10": (125.0, 62.5, 31.2),
}


def peak_tflops(device: str, precision: str, matmul_precision: str) -> float | None:
    """Vendor dense peak for the precision's matmuls on a known GPU; None elsewhere."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if "16" in precision:
                return half
            return fp32 if matmul_precision == "highest" else tf32
    return None


def build_module(model: str, resolution: int, channels: int, extra: list[str]) -> DiffusionModule:
    """A DiffusionModule for ``conf/model/<model>.yaml`` on ``channels x resolution^2`` data."""
    overrides = [
        f"model={model}",
        f"++dataset.resolution={resolution}",
        f"++dataset.channels={channels}",
        *extra,
    ]
    cfg = compose_train(overrides, Path("/tmp/unused"))
    plain = OmegaConf.to_container(cfg, resolve=True)
    return DiffusionModule(
        model=plain["model"],
        schedule=plain["schedule"],
        parameterization=plain["parameterization"],
        loss=plain["loss"],
        optimizer=plain["optimizer"],
        ema=plain["ema"],
        data_shape=[channels, resolution, resolution],
        label_dim=0,
        lr_warmup_steps=plain["lr_warmup_steps"],
    )


class OurStep:
    """``step()`` = one optimizer step of ``module`` at ``precision`` on a fixed random batch."""

    def __init__(
        self,
        module: DiffusionModule,
        batch: int,
        device: str,
        precision: str = "32-true",
        compile: bool = False,
        channels_last: bool = False,
        clip: float = 1.0,
    ) -> None:
        self.module = module.to(device).train()
        if channels_last:
            to_channels_last(self.module)
        if compile:
            compile_network(self.module.denoiser.net)
        self.device, self.batch, self.clip = device, batch, clip
        self.x0 = torch.rand(batch, *module.data_shape, device=device) * 2 - 1
        amp = precision.endswith("-mixed")
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        kind = torch.device(device).type
        self.autocast: Callable = (
            (lambda: torch.autocast(kind, dtype=dtype)) if amp else (lambda: nullcontext())
        )
        self.scaler = torch.amp.GradScaler(kind) if precision == "16-mixed" else None
        factory = instantiate(module.hparams.optimizer)
        params = list(module.parameters())
        # the kernels DiffusionModule.configure_optimizers picks under Lightning at this precision
        # (fused unless float16 loss scaling meets gradient clipping)
        half = precision in ("16-mixed", "16")
        kernels = fast_optimizer_options(factory, params, allow_fused=not (half and clip))
        self.optimizer = factory(params=params, **kernels)
        self.step_count = 0

    def loss(self) -> torch.Tensor:
        """The training loss as ``training_step`` computes it: per-sample seeded sigma and noise
        (new seeds every step, as the data stream gives them)."""
        seeds = torch.arange(self.batch) + self.step_count * self.batch
        labels = torch.zeros(self.batch, dtype=torch.long)  # unconditional: label_dim = 0
        with self.autocast():
            per_sample, _ = self.module.batch_loss((self.x0, labels, seeds))
            return per_sample.mean()

    def step(self) -> None:
        m = self.module
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(m.denoiser.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(m.ema, m.denoiser, m.ema_schedule.beta(self.step_count, self.batch))
        self.step_count += 1


def flops_per_step(step_loss: Callable[[], torch.Tensor]) -> float:
    """Forward + backward FLOPs of one loss evaluation (torch's FLOP counter, eager)."""
    with FlopCounterMode(display=False) as counter:
        step_loss().backward()
    return float(counter.get_total_flops())


def images_per_s(step: Callable[[], None], batch: int, device: str, warmup: int, steps: int):
    """(images/s, seconds of warm-up incl. compilation) over ``steps`` timed steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - t1), t1 - t0


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated (since the last reset), or on CPU the process's peak resident
    memory, in MiB (run one configuration per process for the CPU number to mean anything)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
