"""The LightningModule: network + parameterization = denoiser, loss, optimizer and EMA weights.
Sampling from it is the generator's job (``diffusionlab.sampling.generator``).

Everything is rebuilt from plain config dicts stored in ``hparams``, so
``DiffusionModule.load_from_checkpoint(path)`` restores the exact model without Hydra's app.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator, use_generator
from diffusionlab.diffusion.losses import StepScheduled
from diffusionlab.diffusion.parameterizations import Denoiser
from diffusionlab.errors import CheckpointError
from diffusionlab.networks.autoencoder import LatentDecoder
from diffusionlab.networks.layers import number_dropout_layers
from diffusionlab.networks.text_encoders import TextEncoder
from diffusionlab.training.conditions import (
    ConditionSettings,
    build_encoder,
    build_network,
    training_inputs,
)
from diffusionlab.training.ema import PowerEMA, ema_update
from diffusionlab.training.ema_snapshots import save_snapshots
from diffusionlab.training.log_steps import is_logging_step
from diffusionlab.training.lr_schedules import Constant, build_lr_schedule
from diffusionlab.training.performance import HALF_PRECISIONS, fast_optimizer_options
from diffusionlab.training.repa import build_repa, make_encoder
from diffusionlab.training.rng_state import gather_rng_states, restore_rank_rng_states


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
        lr_schedule: dict | None = None,
        augment: dict | None = None,
        latent: dict | None = None,
        repa: dict | None = None,
        cond: dict | None = None,
    ) -> None:
        super().__init__()
        # the app logs the whole run config; these hparams only rebuild the module from checkpoints
        self.save_hyperparameters(logger=False)
        self.schedule = instantiate(schedule)
        # cond=text|image (training/conditions.py); class labels go through label_dim
        self.cond = ConditionSettings.from_config(cond, data_shape)
        encoder = build_encoder(self.cond)
        param = instantiate(parameterization)(schedule=self.schedule)
        net = build_network(model, self.cond, data_shape, encoder, param.end_features)
        number_dropout_layers(net)  # each dropout layer draws its own per-sample stream
        self.denoiser = Denoiser(net, param)
        # a trainable text encoder is part of the denoiser (trained, EMA-averaged, saved with
        # it); a frozen pretrained one stays outside the weights (reloaded from its folder)
        if isinstance(encoder, torch.nn.Module):
            self.denoiser.cond_encoder = encoder
        self._frozen_encoder = None if isinstance(encoder, torch.nn.Module) else encoder
        self.loss_fn = instantiate(loss)(
            schedule=self.schedule, parameterization=self.denoiser.parameterization
        )
        # EDM's non-leaking augmentation (data/augment.py); None = off
        self.augment_pipe = instantiate(augment) if augment else None
        self.ema_schedule = instantiate(ema)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        # further EMA profiles (ema=power): in the state_dict, so checkpoints hold all of them
        self.ema_profiles = torch.nn.ModuleList(
            copy.deepcopy(self.ema) for _ in range(self.ema_schedule.num_profiles - 1)
        )
        self.data_shape = tuple(int(d) for d in data_shape)
        self.label_dim = int(label_dim)
        self.loss_buckets = [float(b) for b in loss_buckets]
        # latent diffusion (data/latent.py): the frozen decoder maps samples back to images
        self.decoder = (
            None if latent is None else LatentDecoder.from_record(latent).requires_grad_(False)
        )
        self._rng_states: list[dict] | None = None
        self._samples_in_step = 0  # this rank's samples since the last optimizer step
        # REPA (training/repa.py): a projector on one block of the network, aligned with a frozen
        # encoder; built after the EMA copy, so the EMA carries no feature hook. None = off.
        self.repa = build_repa(repa, self.denoiser.net, self.data_shape, self.label_dim)
        if self.repa is not None:  # the resolved block and widths, for checkpoints
            self.hparams["repa"] = self.repa.settings.to_dict()
        self._repa_terms: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ training
    def one_hot(self, labels: Tensor) -> Tensor | None:
        """Integer labels -> float one-hot ``[B, label_dim]`` (None when unconditional), on the
        labels' device without reading them back (``F.one_hot`` checks their range on the host).
        A label outside ``0..label_dim-1`` gives a zero row; the app checks ``label_dim``
        against the dataset's ``num_classes`` before training (cli/train.py)."""
        if self.label_dim == 0:
            return None
        classes = torch.arange(self.label_dim, device=labels.device)
        return (labels[:, None] == classes).float()

    def text_encoder(self, denoiser: torch.nn.Module | None = None) -> TextEncoder | None:
        """The text encoder that goes with ``denoiser`` (default: the trained weights): its own
        trainable encoder, or the frozen pretrained one; None for other condition kinds."""
        own = getattr(denoiser if denoiser is not None else self.denoiser, "cond_encoder", None)
        return own if own is not None else self._frozen_encoder

    def batch_loss(self, batch: tuple) -> tuple[Tensor, Tensor]:
        """(per-sample loss, sigma) of a batch ``(x0, labels, seeds[, extras])``. Each sample's
        sigma, noise, augmentation and dropout masks come from its seed (data/sampler.py) through
        a counter-based generator on the batch's device (diffusion/batched_rng.py): a few kernels
        for the whole batch, nothing read back to the host. ``extras`` (data/datamodule.Collate)
        holds the captions of a captioned dataset and, with REPA, the views that pick the cached
        targets. With REPA the loss adds lambda(step) times the alignment of the clean image
        (REPA eq. 9)."""
        x0, labels, seeds, *rest = batch
        extras = rest[0] if rest else {}
        if isinstance(self.loss_fn, StepScheduled):  # a curriculum follows the optimizer step
            self.loss_fn.set_step(self.global_step)
        generator = BatchedGenerator(seeds, device=x0.device)
        augment_labels = None
        lam = self.repa.settings.coefficient_at(self.global_step) if self.repa else 0.0
        tap = self.repa.tap.capture() if lam > 0 else contextlib.nullcontext()
        with use_generator(generator):
            if self.augment_pipe is not None:
                x0, augment_labels = self.augment_pipe(x0, generator)
            cond = {}
            if self.cond is not None:  # text / image: the condition inputs, some dropped
                enc = self.text_encoder()
                cond["cond"] = training_inputs(
                    self.cond, enc, x0, extras.get("captions"), generator
                )
            with tap:
                per_sample, sigma = self.loss_fn(
                    self.denoiser,
                    x0,
                    class_labels=self.one_hot(labels),
                    augment_labels=augment_labels,
                    generator=generator,
                    **cond,
                )
        if lam > 0:
            align = self.repa.loss(self.repa.tap.value, x0, extras.get("views"))
            self._repa_terms = (per_sample.detach(), align.detach())
            per_sample = per_sample + lam * align
        return per_sample, sigma

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        self._samples_in_step += batch[0].shape[0]
        self._repa_terms = None
        per_sample, sigma = self.batch_loss(batch)
        loss = per_sample.mean()
        # only on logging steps: ``self.log`` costs about 1 ms a call, and the progress bar shows
        # the returned loss itself (training/progress.py)
        if is_logging_step(self.trainer):
            self.log("train/loss", loss)
            if self._repa_terms is not None:  # the buckets show the diffusion loss alone
                per_sample = self._repa_terms[0]
                self.log("train/repa_align", self._repa_terms[1].mean())
                self.log("train/diffusion_loss", per_sample.mean())
            self._log_buckets(per_sample.detach(), sigma.detach())
            images = self.images_seen()
            if images is not None:
                self.log("train/kimg", images / 1000.0)
        return loss

    def images_seen(self) -> int | None:
        """Training images drawn before the current optimizer step, all ranks (EDM's ``kimg`` x
        1000): the datamodule's sample position, carried through resumes; None without one."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is None or not hasattr(datamodule, "position"):
            return None
        return int(datamodule.position(self.trainer.global_step))

    def _log_buckets(self, per_sample: Tensor, sigma: Tensor) -> None:
        """Mean loss per sigma bucket; bucket edges from ``loss_buckets``. A bucket no sample of
        the step fell in logs NaN: skipping it would make Lightning re-log its stale value."""
        edges = [0.0, *self.loss_buckets, math.inf]
        sigma = sigma.reshape(-1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            mask = (sigma >= lo) & (sigma < hi)
            self.log(f"train_sigma/loss_{lo:g}-{hi:g}", per_sample[mask].mean())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not is_logging_step(self.trainer):
            return
        grads = [p.grad for p in self.denoiser.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)))
            self.log("train/grad_norm", norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: checkpoint callbacks run before that hook and would
        # save the EMA one update behind the weights
        global_batch = self._samples_in_step * self.trainer.world_size
        step = self.global_step + 1  # the step being completed
        profiles = [self.ema, *self.ema_profiles]
        for ema, beta in zip(profiles, self.ema_schedule.betas(step, global_batch), strict=True):
            ema_update(ema, self.denoiser, beta)
        self._samples_in_step = 0
        schedule = self.ema_schedule
        # the weights are equal on every rank: rank 0 writes the snapshots
        if (
            isinstance(schedule, PowerEMA)
            and schedule.snapshot_due(step)
            and self.trainer.is_global_zero
        ):
            save_snapshots(
                schedule.snapshot_dir,
                step,
                step * global_batch,
                schedule.sigma_rels,
                schedule.gammas,
                profiles,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = gather_rng_states()
        images = self.images_seen()
        if images is not None:
            checkpoint["images_seen"] = images

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states = checkpoint.get("rng_states")
        saved = {k.split(".")[1] for k in checkpoint["state_dict"] if k.startswith("ema_profiles.")}
        if len(saved) != len(self.ema_profiles):
            raise CheckpointError(
                f"the checkpoint holds {len(saved) + 1} EMA profile(s), the ema config "
                f"{len(self.ema_profiles) + 1}: resume with the ema=... settings that trained it"
            )

    def on_fit_start(self) -> None:
        """REPA: the frozen encoder on this device, and the targets of an in-memory dataset."""
        if self.repa is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        data = None if dm is None or dm.lazy else dm.dataset
        images = getattr(data, "images", None)
        encoder = self.repa.encoder or make_encoder(self.repa.settings.encoder, self.data_shape)
        self.repa.attach(
            encoder,
            images if isinstance(images, Tensor) else None,
            bool(getattr(dm, "hflip", False)),
            self.augment_pipe is not None,
        )

    def on_train_start(self) -> None:
        # restored last, so nothing between checkpoint loading and the first step draws from them
        if self._rng_states is not None:
            restore_rank_rng_states(self._rng_states, self.global_rank)
            self._rng_states = None

    def lr_schedule(self) -> Constant:
        """The factor on ``optimizer.lr`` per optimizer step (training/lr_schedules.py)."""
        return build_lr_schedule(self.hparams.get("lr_schedule"), self.hparams.lr_warmup_steps)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Norm clipping as Lightning's (``clip_grad_norm_`` of the optimizer's parameters), also
        for a fused optimizer under bf16 autocast, which Lightning's check refuses although bf16
        has no loss scaling to undo. float16 (scaled gradients), value clipping and sharded
        strategies keep Lightning's own path."""
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm))
        sharded = "FSDP" in type(self.trainer.strategy).__name__
        if (
            str(self.trainer.precision) in HALF_PRECISIONS
            or sharded
            or algorithm not in ("None", "norm")
        ):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_val:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self) -> dict:
        factory = instantiate(self.hparams.optimizer)
        params = [p for p in self.parameters() if p.requires_grad]
        trainer = self._trainer
        # Lightning cannot clip the gradients of a fused optimizer under float16 loss scaling
        amp_clip = trainer is not None and str(trainer.precision) in HALF_PRECISIONS
        amp_clip = amp_clip and bool(trainer.gradient_clip_val)
        kernels = fast_optimizer_options(factory, params, allow_fused=not amp_clip)
        optimizer = factory(params=params, **kernels)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
