"""``python train.py``: the training app (Hydra 1.3 + Lightning)."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from diffusionlab.checks import number, sampler_numbers
from diffusionlab.cli.common import run_cli, user_errors_exit
from diffusionlab.cli.objective import optimized_value
from diffusionlab.cli.repa import repa_config
from diffusionlab.cli.vocabulary import migrate_config
from diffusionlab.config import CONF_DIR
from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.augment import check_augment
from diffusionlab.data.lazy import fill_from_files
from diffusionlab.diffusion.consistency import ConsistencyDistillationLoss, ECTLoss, TeacherSlot
from diffusionlab.errors import ConfigError
from diffusionlab.interop.module import init_weights
from diffusionlab.sampling.checkpoint import load_module
from diffusionlab.sampling.generator import denoiser_of
from diffusionlab.sampling.spec import SamplerSpec, inherit_sampler
from diffusionlab.stopping import Stopped
from diffusionlab.tracking.loggers import finish_wandb_run, resolve_wandb_mode
from diffusionlab.tracking.run_identity import run_config
from diffusionlab.tracking.run_record import write_run_record
from diffusionlab.tracking.secrets import redact, secret_values, secrets_kept_out
from diffusionlab.training.checkpoint_io import check_resumable
from diffusionlab.training.conditions import needs_captions
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
    cond = _container(cfg.get("cond"))
    datamodule.captions = needs_captions(cond, dataset)  # cond=text: batches carry captions
    # the grid callbacks' default and what sampling from the checkpoint uses unless told otherwise
    spec = SamplerSpec.from_config(_container(cfg.sampler)) if cfg.sampler else SamplerSpec()
    repa = repa_config(cfg, dataset)  # REPA (repa=...): encoder resolved; None = off
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
        repa=None if repa is None else repa[0],
        cond=cond,
    )
    if repa is not None:  # the encoder built above, and each sample's view for its targets
        module.repa.use_encoder(repa[1])
        datamodule.views = True
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
    """loss=cd (and loss=scm with tangent=teacher, loss=meanflow with velocity=teacher): hand
    the loss its teacher's EMA denoiser, read from ``loss.teacher_ckpt`` or else from
    ``init_ckpt`` (the student starts from its teacher). Read at every start, resumed runs
    too: the teacher is not part of the student's checkpoint."""
    loss = module.loss_fn
    if not isinstance(loss, TeacherSlot) or not loss.needs_teacher:
        return
    name = f"loss={loss.config_name}"
    path = loss.teacher_ckpt or cfg.get("init_ckpt")
    key = "loss.teacher_ckpt" if loss.teacher_ckpt else "init_ckpt"
    if not path:
        raise ConfigError(f"{name} needs a teacher: loss.teacher_ckpt=<checkpoint> or init_ckpt=")
    teacher = load_module(str(path), torch.device("cpu"))
    if (tuple(teacher.data_shape), teacher.label_dim) != (module.data_shape, module.label_dim):
        raise ConfigError(
            f"{key}={str(path)!r} generates {tuple(teacher.data_shape)} with label_dim="
            f"{teacher.label_dim}; this run trains {module.data_shape} with label_dim="
            f"{module.label_dim}"
        )
    kinds = [m.cond.kind if m.cond is not None else "none" for m in (teacher, module)]
    if kinds[0] != kinds[1]:
        raise ConfigError(
            f"{key}={str(path)!r} is conditioned on cond={kinds[0]}; this run on cond={kinds[1]}"
        )
    if module.cond is not None and module.cond.trainable_encoder:
        raise ConfigError(
            f"{name} with cond=text needs a frozen text encoder (cond.encoder.kind=clip, t5 or "
            "auto with cond.encoder.path): a trainable one is part of each network, and the "
            "teacher would read the student's embeddings"
        )
    loss.set_teacher(denoiser_of(teacher, use_ema=True))
    steps = getattr(loss, "teacher_sampler", None)  # cd's ODE steps; scm and meanflow read D
    log.info("%s: teacher %s=%s%s", name, key, path, f", steps by {steps}" if steps else "")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train from a composed config; returns the final logged metrics. The W&B run (if any) is
    finished when training ends or fails, so each job of a multirun gets its own."""
    for warning in migrate_config(cfg, "train"):
        log.warning(warning)
    inherit_samplers(cfg)
    if (
        cfg.get("print_config")
        and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
    ):
        print_config_tree(cfg)
    with finish_wandb_run():
        return _train(cfg)


def print_config_tree(cfg: DictConfig) -> None:
    """The composed config as a tree, one branch per top-level key, resolved where it resolves,
    secrets redacted (``print_config=false`` turns it off)."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:
        plain = OmegaConf.to_container(cfg)
    plain = redact(plain, secret_values(plain))
    tree = Tree("config", guide_style="dim")
    for key, value in plain.items():
        if isinstance(value, dict | list) and value:
            text = OmegaConf.to_yaml(OmegaConf.create(value)).rstrip()
            tree.add(str(key)).add(Syntax(text, "yaml", background_color="default"))
        else:
            tree.add(f"{key}: {value}")
    rich_print(tree)


def inherit_samplers(cfg: DictConfig) -> None:
    """Every callback's ``sampler`` node (``sampler=inherit`` by default) filled from the run's
    ``sampler``: the callbacks, the logged config and the checkpoint see the sampler they use."""
    if cfg.get("sampler") is not None and cfg.sampler.get("name") is None:
        raise ConfigError(
            "sampler=inherit: train.py's own sampler (its grids' and the checkpoint's) inherits "
            "from nothing; choose one, e.g. sampler=edm"
        )
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and "sampler" in node:
            merged = inherit_sampler(cfg.get("sampler"), node.sampler)
            with open_dict(cfg):
                cfg.callbacks[name].sampler = OmegaConf.create(merged)


def _train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(number(cfg, "seed", int, at_least=0), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    module, datamodule = build(cfg)
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, "resume_ckpt", module.hparams)
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
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Stopped as e:  # only the work after the last step lets it through (preemption.py)
        raise e.because(
            f"stopped the work after the last step (final sample grid / FID) of a complete "
            f"run, step {trainer.global_step}, saved in {last}; draw and score it with "
            f"python sample.py ckpt={last} / python evaluate.py ckpt={last}"
        ) from None
    if _preemption(trainer).signal == "SIGINT":
        raise Stopped(
            "SIGINT",
            f"SIGINT: stopped at step {trainer.global_step}, saved in {last}; continue with "
            f"python train.py resume_ckpt={last} (and the same overrides)",
        )
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _preemption(trainer: L.Trainer) -> Preemption:
    return next(cb for cb in trainer.callbacks if isinstance(cb, Preemption))


def make_trainer(
    cfg: DictConfig, datamodule: DiffusionDataModule, extra_callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """The Trainer of ``cfg`` with its callbacks and loggers, the run's guards (non-finite steps,
    preemption, compile) and the gradient accumulation derived from the global batch."""
    inherit_samplers(cfg)  # (again, for library callers: filled nodes stay as they are)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks += [
        NonFiniteGuard(
            number(cfg, "max_nonfinite_steps", int, at_least=1), bool(cfg.get("grad_nan_to_num"))
        ),
        Preemption(Path(cfg.paths.output_dir) / "checkpoints"),
    ]
    callbacks += [CompileNetwork()] if cfg.get("compile") else []
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and _wanted(cfg, c)]
    # the datamodule shards the endless sample stream itself (data/sampler.py)
    trainer: L.Trainer = instantiate(
        trainer_config(cfg, datamodule.batch_size),
        callbacks=[*callbacks, *extra_callbacks],
        logger=loggers or False,
        use_distributed_sampler=False,
    )
    trainer.accumulate_grad_batches = datamodule.layout(trainer.world_size).accumulation
    return trainer


def trainer_config(cfg: DictConfig, global_batch: int) -> DictConfig:
    """``cfg.trainer`` for Lightning: ``max_kimg`` (training length in thousands of images, as
    EDM counts it) becomes ``max_steps = ceil(max_kimg * 1000 / data.batch_size)``; the default
    run's time guard (``default_run_max_time``) applies to the default run only."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_kimg = node.pop("max_kimg", None)
    if max_kimg is not None:
        kimg = number(cfg, "trainer.max_kimg", float)
        if kimg <= 0:
            raise ConfigError(f"trainer.max_kimg={max_kimg}: must be > 0 (thousands of images)")
        node["max_steps"] = math.ceil(kimg * 1000 / global_batch)
        log.info(
            "trainer.max_kimg=%g: %d steps of %d images", kimg, node["max_steps"], global_batch
        )
    if node.get("max_time") is None and is_default_run(cfg):
        node["max_time"] = cfg.get("default_run_max_time")
        if node["max_time"]:
            log.info(
                "the default run stops after %s of training (default_run_max_time); any other "
                "run, or trainer.max_time=..., trains to trainer.max_steps",
                node["max_time"],
            )
    return OmegaConf.create(node)


# choosing any of these (or a training length) makes a run other than the default one
_DEFAULT_RUN_GROUPS = ("dataset", "model", "trainer", "experiment", "hparams_search", "debug")
_LENGTH_KEYS = ("trainer.max_steps", "trainer.max_kimg", "trainer.max_time", "trainer.max_epochs")


def is_default_run(cfg: DictConfig) -> bool:
    """Whether this is the default run (``python train.py`` / ``make train``, tweaks allowed):
    no dataset, model, trainer, experiment or search chosen and no training length set on the
    command line. Runs composed without Hydra's app (tests, scripts) are not."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("~+").split("=", 1)[0].split("@", 1)[0]
        if key.split(".", 1)[0] in _DEFAULT_RUN_GROUPS or key in _LENGTH_KEYS:
            return False
    return True


def _wanted(cfg: DictConfig, logger: DictConfig) -> bool:
    """False for the W&B logger when ``wandb.mode`` (or ``WANDB_MODE``) is ``disabled``: W&B is
    turned off the same way in every app."""
    if logger.get("_target_") != "diffusionlab.tracking.loggers.wandb_logger":
        return True
    return resolve_wandb_mode(str(logger.get("mode", "auto"))) != "disabled"


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``resume_ckpt`` (a file, or ``last`` for the newest
    ``<log_dir>/<task>/runs/*/checkpoints/last.ckpt``), else with ``auto_resume`` this run
    directory's own ``checkpoints/last.ckpt`` when it exists."""
    ckpt_path = cfg.get("resume_ckpt")
    if ckpt_path == "last":
        runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
        found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"resume_ckpt=last: no {runs}/*/checkpoints/last.ckpt")
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
    run_cli(app, "train")


if __name__ == "__main__":
    main()
