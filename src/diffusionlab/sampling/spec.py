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
