"""Fitted sigma grids stored beside their checkpoint: ``<ckpt dir>/grids/<sampler>_nfe<n>.json``.

A file holds the grid (``sigmas``, ending at 0), the sampler name, options and NFE it was fitted
for, the checkpoint's name and SHA-256, the fit settings and the held-out errors. A sampler config
with ``discretization: learned`` is resolved to one with the grid's ``sigmas`` by
:func:`resolve_sampler`, which finds the file for the sampler and NFE (or reads ``sampler.sigmas_file``)
and refuses a file fitted for another sampler, NFE or checkpoint.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from diffusionlab.diffusion.grid_fit import GridFit
from diffusionlab.diffusion.samplers import check_sigmas, sampler_info
from diffusionlab.errors import ConfigError
from diffusionlab.files import atomic_write_text, file_sha256


def _full(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """A sampler's options with its defaults filled in: ``{}`` and the defaults spelled out (as
    the sampler YAMLs list them) fit the same grid."""
    try:
        params = inspect.signature(sampler_info(name).fn).parameters
    except ValueError:  # an unknown sampler: compared as written, refused by the spec's check
        return dict(options or {})
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **(options or {})}


def grid_path(ckpt: str | Path, sampler: str, nfe: int) -> Path:
    """Where the grid fitted for ``sampler`` at ``nfe`` lives for checkpoint ``ckpt`` (inside
    it when it is a folder: a ``dl-export`` model)."""
    p = Path(ckpt).expanduser().resolve()
    return (p if p.is_dir() else p.parent) / "grids" / f"{sampler}_nfe{int(nfe)}.json"


def _ckpt_sha256(ckpt: str | Path) -> str:
    """SHA-256 of a checkpoint file (of a ``dl-export`` folder: of its ``model.safetensors``)."""
    path = Path(ckpt)
    return file_sha256(path / "model.safetensors" if path.is_dir() else path)


def save_grid(path: str | Path, fit: GridFit, ckpt: str | Path | None = None) -> Path:
    """Write ``fit`` (grid, sampler, NFE, settings, held-out errors, checkpoint) as JSON."""
    record = {
        "sampler": fit.settings["sampler"],
        "options": fit.settings["options"],
        "nfe": fit.settings["nfe"],
        "sigmas": fit.sigmas.tolist(),
        "initial_sigmas": fit.initial.tolist(),
        "heldout_before": fit.heldout_before,
        "heldout_after": fit.heldout_after,
        "fit_seconds": fit.seconds,
        "settings": fit.settings,
        "ckpt": str(Path(ckpt).name) if ckpt else None,
        "ckpt_sha256": _ckpt_sha256(ckpt) if ckpt else None,
    }
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def load_grid(path: str | Path, key: str = "sampler.sigmas_file") -> dict[str, Any]:
    """The stored record, its ``sigmas`` checked (strictly decreasing, ending at 0)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such grid file")
    try:
        record = json.loads(path.read_text())
        check_sigmas(torch.tensor(record["sigmas"], dtype=torch.float64))
        record["sampler"], record["nfe"] = str(record["sampler"]), int(record["nfe"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}={str(path)!r} is not a fitted grid file ({e})") from None
    return record


def resolve_sampler(
    sampler: dict[str, Any], ckpt: str | Path | None = None, key: str = "sampler"
) -> dict[str, Any]:
    """A copy of the sampler config ``sampler`` (``name``, ``nfe``, ``discretization``,
    ``sigmas_file``, ``options``) with the stored grid's ``sigmas`` when ``discretization`` is
    ``learned`` (from ``sigmas_file``, else from beside ``ckpt``); other samplers are returned
    unchanged. ``key`` names the config node in messages."""
    sampler = dict(sampler)
    if sampler.get("discretization") != "learned":
        if sampler.get("sigmas_file"):
            raise ConfigError(f"{key}.sigmas_file is read only with {key}.discretization=learned")
        return sampler
    name, nfe = sampler["name"], int(sampler["nfe"])
    fit_cmd = f"dl-fit-sigmas ckpt=<checkpoint> sampler={name} sampler.nfe={nfe}"
    if sampler.get("sigmas_file"):
        path = Path(str(sampler["sigmas_file"])).expanduser()
    elif ckpt:
        path = grid_path(ckpt, name, nfe)
        if not path.is_file():
            raise ConfigError(
                f"{key}.discretization=learned: no grid for sampler={name} nfe={nfe} at {path}; "
                f"fit one with {fit_cmd} or pass {key}.sigmas_file=<file>"
            )
    else:
        raise ConfigError(
            f"{key}.discretization=learned needs {key}.sigmas_file=<file> (written by {fit_cmd})"
        )
    record = load_grid(path, f"{key}.sigmas_file")
    options = dict(sampler.get("options") or {})
    fitted = (record["sampler"], record["nfe"], _full(record["sampler"], record.get("options")))
    if fitted != (name, nfe, _full(name, options)):
        raise ConfigError(
            f"{key}.sigmas_file={str(path)!r} was fitted for sampler={record['sampler']} "
            f"nfe={record['nfe']} options={record.get('options') or {}}; it cannot be used with "
            f"sampler={name} nfe={nfe} options={options}: fit one with {fit_cmd}"
        )
    if ckpt and record.get("ckpt_sha256") and record["ckpt_sha256"] != _ckpt_sha256(ckpt):
        raise ConfigError(
            f"{key}.sigmas_file={str(path)!r} was fitted for another checkpoint ({record.get('ckpt')}), "
            f"not ckpt={str(ckpt)!r}: fit one with {fit_cmd}"
        )
    sampler["sigmas"] = record["sigmas"]
    return sampler
