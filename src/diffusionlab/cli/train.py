"""``python train.py``: the training app (Hydra 1.3 + Lightning)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusionlab.cli.objective import optimized_value
from diffusionlab.config import CONF_DIR
from diffusionlab.data import DiffusionDataModule
from diffusionlab.errors import ConfigError
from diffusionlab.training.loggers import finish_wandb_run
from diffusionlab.training.module import DiffusionModule
from diffusionlab.training.performance import CompileNetwork, check_precision, to_channels_last
from diffusionlab.training.run_identity import run_config

log = logging.getLogger(__name__)

# Intentional: the EMA copy lives in eval mode, and the CSV logger shares Hydra's run directory.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def _container(cfg: DictConfig | None) -> dict | None:
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def build(cfg: DictConfig) -> tuple[DiffusionModule, DiffusionDataModule]:
    """Build data and model from the config and check they fit, before any training."""
    datamodule = DiffusionDataModule(
        instantiate(cfg.dataset, _partial_=True), seed=int(cfg.seed), **cfg.data
    )
    dataset = datamodule.dataset
    label_dim = int(cfg.label_dim)
    if label_dim and label_dim != dataset.num_classes:
        raise ConfigError(
            f"label_dim={label_dim} but dataset {cfg.dataset._target_} has "
            f"num_classes={dataset.num_classes}; use label_dim=0 or label_dim={dataset.num_classes}"
        )
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
        sampler=_container(cfg.sampler),
    )
    check_fits(module, dataset.shape)
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


def train(cfg: DictConfig) -> dict[str, float]:
    """Train from a composed config; returns the final logged metrics. The W&B run (if any) is
    finished when training ends or fails, so each job of a multirun gets its own."""
    with finish_wandb_run():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    try:
        check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        module, datamodule = build(cfg)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        callbacks += [CompileNetwork()] if cfg.get("compile") else []
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
        if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            raise ConfigError(
                "trainer.accumulate_grad_batches is derived from data.batch_size (global batch) "
                "and data.batch_per_device; set those instead"
            )
        # the datamodule shards the endless sample stream itself (data/sampler.py)
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            use_distributed_sampler=False,
        )
        trainer.accumulate_grad_batches = datamodule.layout(trainer.world_size).accumulation
        ckpt_path = resume_checkpoint(cfg)
    except (ConfigError, InstantiationException) as e:
        raise SystemExit(f"error: {_root_message(e)}") from None
    for logger in trainer.loggers:
        logger.log_hyperparams(run_config(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


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
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist")
        return str(ckpt_path)
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("auto_resume") and own.is_file():
        log.info("auto_resume: resuming from %s", own)
        return str(own)
    return None


def _root_message(e: BaseException) -> str:
    """The innermost user-facing message of an (instantiation) error chain."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(e, InstantiationException) and cause is not e:
        key = getattr(e, "full_key", None) or str(e).split("full_key:")[-1].strip()
        return f"{cause} (config key: {key})"
    return str(cause)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    try:
        return optimized_value(metrics, cfg.get("optimized_metric"))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
