"""Checks of config numbers before anything runs: each failure names the config key."""

from __future__ import annotations

import math

from omegaconf import DictConfig, ListConfig, OmegaConf

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


def numbers(cfg: DictConfig, key: str) -> list[float]:
    """``cfg.<key>``, one number or a non-empty list of them, as a list of floats."""
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"pass {key}=<value> or a list, e.g. {key}=[0.05,0.1]")
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, ListConfig):
        return [float(number(cfg, key))]
    if not value:
        raise ConfigError(f"{key}=[] is empty")
    return [float(number(OmegaConf.create({"v": v}), "v")) for v in value]


def sampler_numbers(cfg: DictConfig, prefix: str = "sampler") -> None:
    """``sampler.nfe >= 1`` (network evaluations per image)."""
    if OmegaConf.select(cfg, f"{prefix}.nfe", default=None) is not None:
        number(cfg, f"{prefix}.nfe", int, at_least=1)
