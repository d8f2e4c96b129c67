"""What a W&B run is called and where it belongs, read from Hydra: the name is the job's overrides,
the group is the sweep (or the single run's directory), the job type is the task, and the run
config carries each config group's choice (``schedule: vp``) as a top-level key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from diffusionlab.tracking.secrets import is_secret_name, redact, redact_text, secret_values

# Override keys left out of run names: paths and logging plumbing, not experiment choices.
NAME_EXCLUDE = (
    "paths",
    "hydra",
    "logger",
    "wandb",
    "callbacks",
    "tags",
    "resume_ckpt",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
)


def hydra_config() -> DictConfig | None:
    """The running app's ``hydra`` node, or None outside a Hydra app (compose API, tests)."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def _key(override: str) -> str:
    """``~callbacks.x=null`` / ``+a.b=1`` / ``schedule=vp`` -> the bare key ``callbacks.x`` ..."""
    return override.split("=", 1)[0].lstrip("~+")


def _excluded(key: str, exclude: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "@") for p in exclude)


def _is_multirun(hydra: DictConfig) -> bool:
    """``hydra.mode`` is a ``RunMode`` in the app and the string ``MULTIRUN`` in hydra.yaml."""
    return str(hydra.mode).endswith("MULTIRUN")


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys a multirun sweeps over (``schedule=vp,edm``), from ``<sweep dir>/multirun.yaml``
    (Hydra's basic sweeper writes it); None when that file is missing."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    task = OmegaConf.load(path).hydra.overrides.task
    parsed = OverridesParser.create().parse_overrides(list(task))
    return {_key(o.input_line) for o in parsed if o.is_sweep_override()}


def run_name(hydra: DictConfig | None, exclude: Sequence[str] = NAME_EXCLUDE) -> str:
    """The job's overrides as ``key=value,key=value`` in command-line order: in a multirun only
    the swept keys, so the name says how the job differs from its siblings; keys under
    ``exclude`` are left out; ``default`` when nothing is left."""
    if hydra is None:
        return "default"
    overrides = [
        o
        for o in hydra.overrides.task
        if not _excluded(_key(o), exclude) and not is_secret_name(_key(o))
    ]
    if _is_multirun(hydra):
        swept = swept_keys(Path(hydra.sweep.dir))
        if swept is not None:
            overrides = [o for o in overrides if _key(o) in swept]
    # a secret (an API key given on the command line) never names a run
    return redact_text(",".join(overrides), secret_values()) or "default"


def run_group(hydra: DictConfig | None, fallback: str | Path = "") -> str:
    """The sweep directory's name in a multirun, the run directory's name for a single run
    (``fallback``'s name outside Hydra), so every job of a sweep shares one W&B group."""
    if hydra is None:
        return Path(fallback).name
    if _is_multirun(hydra):
        return Path(hydra.sweep.dir).name
    return Path(hydra.runtime.output_dir).name


def group_choices(hydra: DictConfig | None) -> dict[str, str | None]:
    """Each config group's choice (``{"schedule": "vp", "sampler": "heun", ...}``), without
    Hydra's own groups and groups placed under another package (``eval@callbacks.fid``)."""
    if hydra is None:
        return {}
    choices: Mapping = hydra.runtime.choices
    return {
        g: c
        for g, c in choices.items()
        if g != "hydra" and "/" not in g and "@" not in g and not g.startswith("hydra")
    }


def run_config(cfg: DictConfig, choices: Mapping[str, str | None] | None = None) -> dict:
    """The resolved config with each group's choice as a top-level key (``schedule: vp``), so W&B
    can group runs and draw parallel coordinates by choice; the group's resolved node moves to
    ``<group>_cfg`` (``schedule_cfg.sigma_max``). Secret-named keys and secret values are
    redacted: this is what loggers receive."""
    if choices is None:
        choices = group_choices(hydra_config())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out = {(f"{k}_cfg" if k in choices else k): v for k, v in resolved.items()}
    out.update(choices)
    return redact(out, secret_values(resolved))
