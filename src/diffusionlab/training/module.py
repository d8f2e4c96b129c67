"""The LightningModule: network + parameterization = denoiser, loss, optimizer and EMA weights.

Everything is rebuilt from plain config dicts stored in ``hparams``, so
``DiffusionModule.load_from_checkpoint(path)`` restores the exact model without Hydra's app.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import grad_norm
from torch import Tensor

from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.diffusion.parameterizations import Denoiser
from diffusionlab.diffusion.samplers import sample as run_sampler
from diffusionlab.errors import ConfigError
from diffusionlab.training.ema import ema_update


class DiffusionModule(L.LightningModule):
    """Trains ``D(x~; sigma)`` with ``loss`` and keeps an EMA copy used for sampling."""

    def __init__(
        self,
        model: dict,
        schedule: dict,
        parameterization: dict,
        loss: dict,
        optimizer: dict,
        ema: dict,
        data_shape: Sequence[int],
        label_dim: int = 0,
        lr_warmup_steps: int = 0,
        loss_buckets: Sequence[float] = (0.1, 0.5, 1.0, 2.0, 10.0),
        sampler: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.schedule = instantiate(schedule)
        net = instantiate(model)
        self.denoiser = Denoiser(net, instantiate(parameterization)(schedule=self.schedule))
        self.loss_fn = instantiate(loss)(
            schedule=self.schedule, parameterization=self.denoiser.parameterization
        )
        self.ema_schedule = instantiate(ema)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.label_dim = int(label_dim)
        self.loss_buckets = [float(b) for b in loss_buckets]

    # ------------------------------------------------------------------ training
    def one_hot(self, labels: Tensor) -> Tensor | None:
        """Integer labels -> float one-hot ``[B, label_dim]`` (None when unconditional)."""
        if self.label_dim == 0:
            return None
        if (labels < 0).any():
            raise ConfigError(f"label_dim={self.label_dim} but the dataset has no labels")
        return F.one_hot(labels, self.label_dim).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        per_sample, sigma = self.loss_fn(self.denoiser, x0, class_labels=self.one_hot(labels))
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        self._log_buckets(per_sample.detach(), sigma.detach())
        return loss

    def _log_buckets(self, per_sample: Tensor, sigma: Tensor) -> None:
        """Mean loss per sigma bucket; bucket edges from ``loss_buckets``."""
        edges = [0.0, *self.loss_buckets, math.inf]
        sigma = sigma.reshape(-1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = (sigma >= lo) & (sigma < hi)
            if mask.any():
                self.log(f"train_sigma/loss_{lo:g}-{hi:g}", per_sample[mask].mean())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.denoiser, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        beta = self.ema_schedule.beta(self.global_step, batch[0].shape[0] * self.trainer.world_size)
        ema_update(self.ema, self.denoiser, beta)

    def configure_optimizers(self) -> dict:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        warmup = max(int(self.hparams.lr_warmup_steps), 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        class_labels: Tensor | None = None,
        sampler: dict | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Samples in [-1, 1] for ``seeds`` (one per image, independent of batching).

        ``sampler`` holds ``name``, ``nfe``, ``discretization`` and ``options``; default: the
        sampler stored in the hyperparameters.
        """
        cfg = dict(sampler or self.hparams.sampler or {"name": "heun", "nfe": 35})
        denoiser = self.ema if use_ema else self.denoiser
        gen = StackedRandomGenerator(seeds, device=self.device)
        noise = gen.randn((len(seeds), *self.data_shape))

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return denoiser(x, sigma, class_labels=class_labels)

        out = run_sampler(
            denoise,
            self.schedule,
            noise,
            sampler=cfg.get("name", "heun"),
            nfe=int(cfg.get("nfe", 35)),
            discretization=cfg.get("discretization", "karras"),
            options=dict(cfg.get("options") or {}),
            generator=gen,
        )
        return out
