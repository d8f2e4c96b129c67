"""``python train.py``: the training app (Hydra 1.3 + Lightning)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.objective import optimized_value
from diffusionlab.config import CONF_DIR
from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.augment import check_augment
from diffusionlab.data.lazy import fill_from_files
from diffusionlab.diffusion.consistency import ConsistencyDistillationLoss, ECTLoss
from diffusionlab.errors import ConfigError
from diffusionlab.interop.module import init_weights
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import denoiser_of
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.tracking.loggers import finish_wandb_run
from diffusionlab.tracking.run_identity import run_config
from diffusionlab.tracking.run_record import write_run_record
from diffusionlab.tracking.secrets import redact, secret_values, secrets_kept_out
from diffusionlab.training.checkpoint_io import check_resumable
from diffusionlab.training.module import DiffusionModule
from diffusionlab.training.nonfinite import NonFiniteGuard
from diffusionlab.training.performance import CompileNetwork, check_precision, to_channels_last
from diffusionlab.training.preemption import Preemption

log = logging.getLogger(__name__)

# Intentional: the EMA copy lives in eval mode, and the CSV logger shares Hydra's run directory.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# Lightning's own use of a torch pytree API that newer torch deprecates; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _container(cfg: DictConfig | None) -> dict | None:
    """A resolved plain copy of a config group without secrets (it lands in the checkpoint)."""
    return (
        None if cfg is None else redact(OmegaConf.to_container(cfg, resolve=True), secret_values())
    )


def check_numbers(cfg: DictConfig) -> None:
    """Values a user can get wrong, checked before anything is built."""
    if "lr" in (cfg.get("optimizer") or {}):
        number(cfg, "optimizer.lr", above=0)
    number(cfg, "data.batch_size", int, at_least=1)
    number(cfg, "trainer.max_steps", int, at_least=-1)
    number(cfg, "lr_warmup_steps", int, at_least=0)
    # dataset.num_classes null: the files decide (dataset=zip); checked again once they have
    number(cfg, "label_dim", int, at_least=0, optional=cfg.dataset.get("num_classes", 0) is None)
    sampler_numbers(cfg)
    for key in cfg.get("augment") or {}:
        if key != "_target_":
            number(cfg, f"augment.{key}", at_least=0)
    try:
        for group in ("model", "dataset"):
            OmegaConf.to_container(cfg[group], resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(
            f"model={cfg.model._target_} does not fit dataset={cfg.dataset._target_} "
            f"({str(e).splitlines()[0]}); "
            "2-D datasets (dataset=toy2d) take model=mlp, image datasets an image network"
        ) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: a value is required (e.g. {missing[0]}=...)")


def build(cfg: DictConfig) -> tuple[DiffusionModule, DiffusionDataModule]:
    """Build data and model from the config and check they fit, before any training."""
    check_numbers(cfg)
    datamodule = DiffusionDataModule(
        instantiate(cfg.dataset, _partial_=True), seed=int(cfg.seed), **cfg.data
    )
    try:
        dataset = datamodule.dataset
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"dataset={cfg.dataset._target_} cannot be built from dataset.* "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    fill_from_files(cfg.dataset, dataset)  # dataset=zip etc.: resolution, channels from files
    label_dim = int(number(cfg, "label_dim", int, at_least=0))
    if label_dim and label_dim != dataset.num_classes:
        raise ConfigError(
            f"label_dim={label_dim} but dataset {cfg.dataset._target_} has "
            f"num_classes={dataset.num_classes}; use label_dim=0 or label_dim={dataset.num_classes}"
        )
    # the grid callbacks' default and what sampling from the checkpoint uses unless told otherwise
    spec = SamplerSpec.from_config(_container(cfg.sampler)) if cfg.sampler else SamplerSpec()
    module = DiffusionModule(
        model=_container(cfg.model),
        schedule=_container(cfg.schedule),
        parameterization=_container(cfg.parameterization),
        loss=_container(cfg.loss),
        optimizer=_container(cfg.optimizer),
        ema=_container(cfg.ema),
        data_shape=list(dataset.shape),
        label_dim=label_dim,
        lr_warmup_steps=cfg.lr_warmup_steps,
        sampler=spec.to_dict() if cfg.sampler else None,
        lr_schedule=_container(cfg.get("lr_schedule")),
        augment=_container(cfg.get("augment")),
        latent=getattr(dataset, "latent", None),
    )
    module.lr_schedule()  # a bad lr_schedule.* value stops here, not at the first step
    check_augment(module.augment_pipe, int(cfg.model.get("augment_dim", 0)), dataset.shape)
    if module.decoder is not None:
        module.decoder.load_from(dataset.autoencoder)
    check_fits(module, dataset.shape)
    spec.check(module.schedule)
    if cfg.get("channels_last"):
        to_channels_last(module)
    return module, datamodule


@torch.no_grad()
def check_fits(module: DiffusionModule, shape: tuple[int, ...]) -> None:
    """One forward pass on a zero batch: the network must map data shape to data shape."""
    x = torch.zeros(2, *shape)
    labels = module.one_hot(torch.zeros(2, dtype=torch.long)) if module.label_dim else None
    try:
        out = module.denoiser(x, torch.ones(2), class_labels=labels)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model does not accept data of shape {tuple(shape)} "
            f"(dataset.resolution / dataset.channels): {e}"
        ) from e
    if out.shape != x.shape:
        raise ConfigError(
            f"model maps data of shape {tuple(shape)} to {tuple(out.shape[1:])}; "
            "check model.out_channels and dataset.resolution"
        )


def check_tuning(module: DiffusionModule, cfg: DictConfig, resuming: bool) -> None:
    """loss=ect tunes a trained diffusion model (Geng et al. 2024): a fresh run needs its
    ``init_ckpt``; consistency training from scratch is loss=ict."""
    loss = module.loss_fn
    tuning = isinstance(loss, ECTLoss) and not isinstance(loss, ConsistencyDistillationLoss)
    if tuning and not resuming and not cfg.get("init_ckpt"):
        raise ConfigError(
            "init_ckpt: a value is required for loss=ect, which tunes a trained diffusion "
            "model (a train.py last.ckpt, an NVlabs pickle or a dl-export folder); "
            "consistency training from scratch is loss=ict"
        )


def attach_teacher(module: DiffusionModule, cfg: DictConfig) -> None:
    """loss=cd: hand the loss its teacher's EMA denoiser, read from ``loss.teacher_ckpt`` or else
    from ``init_ckpt`` (the student starts from its teacher). Read at every start, resumed runs
    too: the teacher is not part of the student's checkpoint."""
    loss = module.loss_fn
    if not isinstance(loss, ConsistencyDistillationLoss):
        return
    path = loss.teacher_ckpt or cfg.get("init_ckpt")
    key = "loss.teacher_ckpt" if loss.teacher_ckpt else "init_ckpt"
    if not path:
        raise ConfigError("loss=cd needs a teacher: loss.teacher_ckpt=<checkpoint> or init_ckpt=")
    teacher = load_module(str(path), torch.device("cpu"))
    if (tuple(teacher.data_shape), teacher.label_dim) != (module.data_shape, module.label_dim):
        raise ConfigError(
            f"{key}={str(path)!r} generates {tuple(teacher.data_shape)} with label_dim="
            f"{teacher.label_dim}; this run trains {module.data_shape} with label_dim="
            f"{module.label_dim}"
        )
    loss.set_teacher(denoiser_of(teacher, use_ema=True))
    log.info("loss=cd: teacher %s=%s, steps by %s", key, path, loss.teacher_sampler)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train from a composed config; returns the final logged metrics. The W&B run (if any) is
    finished when training ends or fails, so each job of a multirun gets its own."""
    with finish_wandb_run():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(number(cfg, "seed", int, at_least=0), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    module, datamodule = build(cfg)
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, "ckpt_path", module.hparams)
    elif cfg.get("init_ckpt"):  # fine-tune: weights of a checkpoint, NVlabs pickle or export
        init_weights(module, str(cfg.init_ckpt))
    check_tuning(module, cfg, resuming=bool(ckpt_path))
    attach_teacher(module, cfg)
    if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches is derived from data.batch_size (global batch) "
            "and data.batch_per_device; set those instead"
        )
    trainer = make_trainer(cfg, datamodule)
    config = run_config(cfg)
    with secrets_kept_out(OmegaConf.to_container(cfg, resolve=True), cfg.paths.output_dir):
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
        write_run_record(cfg.paths.output_dir, config, trainer.loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def make_trainer(
    cfg: DictConfig, datamodule: DiffusionDataModule, extra_callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """The Trainer of ``cfg`` with its callbacks and loggers, the run's guards (non-finite steps,
    preemption, compile) and the gradient accumulation derived from the global batch."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks += [
        NonFiniteGuard(
            number(cfg, "max_nonfinite_steps", int, at_least=1), bool(cfg.get("grad_nan_to_num"))
        ),
        Preemption(Path(cfg.paths.output_dir) / "checkpoints"),
    ]
    callbacks += [CompileNetwork()] if cfg.get("compile") else []
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    # the datamodule shards the endless sample stream itself (data/sampler.py)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *extra_callbacks],
        logger=loggers or False,
        use_distributed_sampler=False,
    )
    trainer.accumulate_grad_batches = datamodule.layout(trainer.world_size).accumulation
    return trainer


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` (a file, or ``last`` for the newest
    ``<log_dir>/<task>/runs/*/checkpoints/last.ckpt``), else with ``auto_resume`` this run
    directory's own ``checkpoints/last.ckpt`` when it exists."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"ckpt_path=last: no {runs}/*/checkpoints/last.ckpt")
        return str(found[-1])
    if ckpt_path:
        return str(ckpt_path)
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("auto_resume") and own.is_file():
        log.info("auto_resume: resuming from %s", own)
        return str(own)
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@user_errors_exit
def app(cfg: DictConfig) -> float | None:
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


def main() -> None:
    """``train.py`` / ``dl-train``: user errors end as one ``error: ...`` line."""
    run_cli(app)


if __name__ == "__main__":
    main()
