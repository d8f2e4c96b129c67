"""The sampler spec: how images are drawn (sampler, NFE budget, sigma grid, options, noise), one
frozen record built once from a config node and handed to everything that samples.

Every use site builds its own spec from its own node with :meth:`SamplerSpec.from_config` (the key
names the node in messages: ``sampler``, ``callbacks.fid.sampler``, ...); the spec yields its sigma
grid (a learned grid included, resolved beside the checkpoint) and runs the sampler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.learned_grids import resolve_sampler
from diffusionlab.diffusion.noise import Generator, StackedRandomGenerator, noise_generator
from diffusionlab.diffusion.samplers import (
    Callback,
    Denoise,
    Sampler,
    check_sigmas,
    get_sampler,
    sigmas_for_nfe,
)
from diffusionlab.errors import ConfigError


@dataclass(frozen=True)
class SamplerSpec:
    """``name`` (a registered sampler) with ``options``, spending ``nfe`` network evaluations on
    the ``discretization`` grid (``learned``: the fitted ``sigmas``, read from ``sigmas_file`` or
    from beside the checkpoint); ``noise`` names the per-sample noise source
    (:func:`~diffusionlab.diffusion.noise.noise_generator`). The field names are the config keys
    (``grid``, the name of ``sigmas_file`` before issue 21, is read as it in stored specs)."""

    name: str = "heun"
    nfe: int = 35
    discretization: str = "karras"
    sigmas_file: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    noise: str = "per_seed"
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "nfe", int(self.nfe))
        set_(self, "options", MappingProxyType(dict(self.options or {})))
        if self.sigmas_file is not None:
            set_(self, "sigmas_file", str(self.sigmas_file))
        if self.sigmas is not None:
            set_(self, "sigmas", tuple(float(s) for s in self.sigmas))

    def __hash__(self) -> int:  # options is a read-only mapping, hashed by its items
        return hash(repr(self.to_dict()))

    def __reduce__(self) -> tuple:  # a read-only mapping does not pickle (DDP spawn, deepcopy)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return (type(self), tuple({**values, "options": dict(self.options)}.values()))

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any] | None = None,
        *,
        ckpt: str | Path | None = None,
        key: str = "sampler",
    ) -> SamplerSpec:
        """The spec of a config node (a mapping or DictConfig with the field names as keys;
        missing keys take the defaults, None is all defaults). A ``learned`` discretization is
        resolved to its fitted grid (``grid``, else the file beside ``ckpt``) and refused when
        that grid was fitted for another sampler, NFE or checkpoint, unless the node holds the
        resolved ``sigmas`` already; ``key`` names the node."""
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        plain = dict(cfg or {})
        if "grid" in plain:  # a spec stored before sigmas_file had its name
            grid = plain.pop("grid")
            plain.setdefault("sigmas_file", grid)
        unknown = sorted(set(plain) - {f.name for f in fields(cls)})
        if unknown:
            valid = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"{key} has unknown keys {unknown}; valid: {valid}")
        full = {**cls().to_dict(), **plain}
        if plain.get("sigmas") is not None:  # resolved already (a spec stored in a checkpoint)
            return cls(**full)
        return cls(**resolve_sampler(full, ckpt, key))

    @classmethod
    def of(
        cls, sampler: SamplerSpec | Mapping[str, Any] | None, key: str = "sampler"
    ) -> SamplerSpec:
        """``sampler`` itself, or the spec of a config mapping (:meth:`from_config`)."""
        return sampler if isinstance(sampler, SamplerSpec) else cls.from_config(sampler, key=key)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain config values (stored in checkpoints and results); ``sigmas`` only
        when a learned grid was resolved."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sigmas"}
        out["options"] = dict(self.options)
        if self.sigmas is not None:
            out["sigmas"] = list(self.sigmas)
        return out

    def sampler(self) -> Sampler:
        """A fresh :class:`Sampler` (it counts the NFE of its last run)."""
        return get_sampler(self.name, **self.options)

    def sigmas_for(
        self,
        schedule: Any,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The decreasing sigma grid (ending at 0) that spends at most ``nfe`` evaluations."""
        grid = {"sigmas": list(self.sigmas)} if self.sigmas is not None else {}
        return sigmas_for_nfe(
            schedule,
            self.name,
            self.nfe,
            self.discretization,
            options=dict(self.options),
            dtype=dtype,
            device=device,
            **grid,
        )

    def noise_generator(
        self, seeds: Sequence[int], device: torch.device | str = "cpu"
    ) -> StackedRandomGenerator | BatchedGenerator:
        """The per-sample noise source for ``seeds`` (row i from seed i, whatever the batch)."""
        return noise_generator(self.noise, seeds, device)

    def sample(
        self,
        denoise: Denoise,
        schedule: Any,
        noise: Tensor,
        *,
        generator: Generator = None,
        callback: Callback | None = None,
    ) -> Tensor:
        """From standard-normal ``noise`` to samples: the grid for the NFE budget (in ``noise``'s
        dtype and device), the noise scaled to ``sigmas[0]``, the sampler run."""
        smp = self.sampler()
        sigmas = self.sigmas_for(schedule, dtype=noise.dtype, device=noise.device)
        return smp(denoise, noise * sigmas[0], sigmas, generator=generator, callback=callback)

    def check(self, schedule: Any, key: str = "sampler") -> None:
        """Name, options, NFE, grid and noise kind give a valid run on ``schedule``, checked
        before any network runs; a :class:`ConfigError` names ``key``."""
        try:
            self.sampler()
            check_sigmas(self.sigmas_for(schedule))
            self.noise_generator([])
        except (ValueError, TypeError, KeyError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{key}={self.name}: {e}") from None


def inherit_sampler(
    base: SamplerSpec | Mapping[str, Any] | None, node: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The sampler config of a use site whose ``node`` inherits ``base`` (``sampler=inherit``:
    the run's sampler for the training callbacks, the checkpoint's for sample.py). A key of
    ``node`` left null keeps ``base``'s value and ``node``'s options are merged over ``base``'s; a
    ``node`` that names another sampler than ``base`` stands alone (its unset keys take the
    spec's defaults). ``base`` None is the spec's defaults."""
    if isinstance(base, SamplerSpec):
        base = base.to_dict()
    if OmegaConf.is_config(base):
        base = OmegaConf.to_container(base, resolve=True)
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    base, node = dict(base or SamplerSpec().to_dict()), dict(node or {})
    if "grid" in base:  # a spec stored before sigmas_file had its name
        base.setdefault("sigmas_file", base.pop("grid"))
    if node.get("name") is not None and node["name"] != base.get("name"):
        return {k: v for k, v in node.items() if v is not None and v != {}}
    out = dict(base)
    for key, value in node.items():
        if key == "options":
            if value:
                out["options"] = {**(base.get("options") or {}), **value}
        elif value is not None:
            out[key] = value
    changed = any(out.get(k) != base.get(k) for k in ("name", "nfe", "discretization", "options"))
    if node.get("sigmas") is None and (
        changed or out.get("sigmas_file") != base.get("sigmas_file")
    ):
        out.pop("sigmas", None)  # a learned grid resolved for base: resolved again for out
    return out
