"""Checks of config numbers before anything runs: each failure names the config key."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffusionlab.errors import ConfigError


def number(
    cfg: DictConfig,
    key: str,
    kind: type[int] | type[float] = float,
    above: float | None = None,
    at_least: float | None = None,
    optional: bool = False,
) -> int | float | None:
    """``cfg.<key>`` as ``kind``; must be finite, ``> above`` and ``>= at_least`` when given.

    ``optional`` lets ``null`` (or a missing key) through as None."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        out = kind(value)
        if kind is int and out != value and not (isinstance(value, str) and str(out) == value):
            raise TypeError
    except (TypeError, ValueError):
        word = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}={value!r} must be {word}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{key}={value!r} must be finite")
    if above is not None and not out > above:
        raise ConfigError(f"{key}={value!r} must be > {above:g}")
    if at_least is not None and not out >= at_least:
        raise ConfigError(f"{key}={value!r} must be >= {at_least:g}")
    return out


def sampler_numbers(cfg: DictConfig, prefix: str = "sampler") -> None:
    """``sampler.nfe >= 1`` (network evaluations per image)."""
    if OmegaConf.select(cfg, f"{prefix}.nfe", default=None) is not None:
        number(cfg, f"{prefix}.nfe", int, at_least=1)


def check_sampler(sampler: dict[str, Any], schedule: Any, key: str = "sampler") -> None:
    """The sampler's name, options, NFE and discretization give a valid sigma grid for
    ``schedule``, checked before any network runs."""
    from diffusionlab.diffusion.samplers import check_sigmas, get_sampler, sigmas_for_nfe

    name = sampler.get("name", "heun")
    options = dict(sampler.get("options") or {})
    try:
        get_sampler(name, **options)
        check_sigmas(
            sigmas_for_nfe(
                schedule,
                name,
                int(sampler.get("nfe", 35)),
                sampler.get("discretization", "karras"),
                options=options,
                **({"sigmas": sampler["sigmas"]} if sampler.get("sigmas") is not None else {}),
            )
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key}={name}: {e}") from None
