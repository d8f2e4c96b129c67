"""The training sample grid's record: what each ``samples/step_XXXXXX.png`` was drawn with (seeds,
labels, sampler spec, guidance and guide, weights' memory layout), written beside it as
``step_XXXXXX.json``, and the one function that draws a grid. The training callback draws with
:func:`draw_grid` and ``sample.py from_run=<run>`` reads the record and draws with it again, so
the same checkpoint gives the same pixels (on the same device type and thread count)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusionlab.errors import ConfigError
from diffusionlab.files import atomic_write_text
from diffusionlab.sampling.conditioning import condition_of
from diffusionlab.sampling.generator import generate
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.training.module import DiffusionModule


@dataclass(frozen=True)
class GridRecord:
    """One step's grids: ``seeds``, the class ``labels`` (sample i: ``i % label_dim``; None for
    unconditional models), the resolved ``sampler`` spec, whether the weights were
    ``channels_last``, and each PNG with its guidance weight (``images``); guided images used the
    run's guide ``guide_ckpt`` (relative to the run folder), taken at ``guide_step``, for sigma in
    ``guidance_interval`` only when set."""

    step: int
    seeds: tuple[int, ...]
    labels: tuple[int, ...] | None
    sampler: dict[str, Any]
    channels_last: bool = False
    images: dict[str, float] = field(default_factory=dict)
    guide_ckpt: str | None = None
    guide_step: int | None = None
    guidance_interval: list[float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> GridRecord:
        try:
            data = json.loads(Path(path).read_text())
            data["seeds"] = tuple(data["seeds"])
            data["labels"] = None if data["labels"] is None else tuple(data["labels"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{path} is not a sample grid record ({e})") from None


def draw_grid(
    module: DiffusionModule,
    seeds: Sequence[int],
    values: Sequence[int] | Tensor | None,
    sampler: SamplerSpec | dict | None,
    guide: DiffusionModule | nn.Module | None = None,
    guidance: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
) -> Tensor:
    """The grid of ``seeds`` with condition ``values`` (class labels, prompt indices or low-res
    images; EMA weights, one batch): what the training callback draws and what ``sample.py
    from_run=`` draws again."""
    if values is not None and not isinstance(values, Tensor):
        values = torch.tensor(list(values))
    if values is not None and condition_of(module) is None:
        values = None  # an unconditional model ignores them
    return generate(
        module,
        seeds,
        sampler=sampler,
        guide=guide,
        guidance=guidance,
        guidance_interval=guidance_interval,
        conditions=None if values is None else values.to(module.device),
    )


def record_path(png: str | Path) -> Path:
    """The record of a grid PNG (``step_000500.png`` and ``step_000500_autoguided.png`` share
    ``step_000500.json``)."""
    p = Path(png)
    return p.with_name(p.name.split(".")[0].removesuffix("_autoguided") + ".json")


def write_record(path: str | Path, record: GridRecord) -> Path:
    return atomic_write_text(path, record.to_json())


@dataclass(frozen=True)
class RunGrid:
    """A grid of a training run to draw again: its ``record``, the PNG (``image``) and its
    guidance, the checkpoint that holds the weights it was drawn from, and the guide's file."""

    record: GridRecord
    image: Path
    guidance: float
    ckpt: Path
    guide_ckpt: Path | None


def find_run_grid(from_run: str | Path) -> RunGrid:
    """``from_run``: a training run folder (its newest grid whose weights a checkpoint holds; the
    autoguided grid when the run drew one) or one grid's PNG or record. The checkpoint is
    ``checkpoints/step_<step>.ckpt``, else ``checkpoints/last.ckpt`` when it is of that step."""
    path = Path(from_run).expanduser()
    if path.is_dir():
        run, pngs = path, sorted((path / "samples").glob("step_*.png"), reverse=True)
        if not pngs:
            raise ConfigError(f"from_run={from_run!r}: no samples/step_*.png in that run folder")
    elif path.suffix in (".png", ".json") and path.parent.name == "samples":
        run, pngs = path.parent.parent, [path] if path.suffix == ".png" else []
        if not pngs:  # a record: its guided image when there is one
            record = GridRecord.read(path)
            pngs = [path.with_name(n) for n in sorted(record.images, key=lambda n: -len(n))]
    else:
        raise ConfigError(
            f"from_run={from_run!r}: pass a training run folder or one of its "
            "samples/step_XXXXXX.png"
        )
    for png in pngs:
        rec_path = record_path(png)
        if not rec_path.is_file():
            continue
        record = GridRecord.read(rec_path)
        ckpt = _checkpoint_of(run, record.step)
        if ckpt is not None and png.name in record.images:
            guide = run / record.guide_ckpt if record.guide_ckpt else None
            return RunGrid(record, png, record.images[png.name], ckpt, guide)
        if path.is_file():
            raise ConfigError(
                f"from_run={from_run!r}: no checkpoint of step {record.step} in {run}/checkpoints"
                if ckpt is None
                else f"from_run={from_run!r}: {png.name} is not in its record {rec_path.name}"
            )
    raise ConfigError(
        f"from_run={from_run!r}: no sample grid with its record (samples/step_XXXXXX.json) and "
        "the checkpoint of its step; grids are recorded since issue 21"
    )


def _checkpoint_of(run: Path, step: int) -> Path | None:
    own = run / "checkpoints" / f"step_{step:06d}.ckpt"
    if own.is_file():
        return own
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        if int(state.get("global_step", -1)) == step:
            return last
    return None
