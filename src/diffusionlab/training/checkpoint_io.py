"""Checkpoint files: atomic writes that never hold non-finite weights, and validated
``weights_only=True`` reads that name the file when it is missing, truncated or foreign."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusionlab.errors import CheckpointError, TrainingDiverged
from diffusionlab.files import atomic_write

# hyperparameters that define what the weights mean; a resumed run must match them
MODEL_KEYS = (
    "model",
    "schedule",
    "parameterization",
    "data_shape",
    "label_dim",
    "latent",
    "cond",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp`` in the same folder, fsync, then ``os.replace``: a kill
    during a save leaves the previous file at ``path`` intact. Refuses non-finite weights."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingDiverged(
                f"refusing to write {path}: non-finite weights in {', '.join(bad[:3])}"
            )
        atomic_write(path, lambda f: self.write(checkpoint, f))

    def write(self, checkpoint: dict[str, Any], f) -> None:
        """Serialize ``checkpoint`` into the open temporary file."""
        torch.save(checkpoint, f)


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state`` that hold NaN or inf."""
    return [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


def read_checkpoint(path: str | Path, key: str, map_location: Any = "cpu") -> dict[str, Any]:
    """A train.py checkpoint loaded with ``weights_only=True`` (no code runs from the file).

    ``key`` is the config key that named the file; every failure is a :class:`CheckpointError`."""
    p = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if not p.is_file():
        raise CheckpointError(f"{where} does not exist" + (" (a folder)" if p.is_dir() else ""))
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{where} holds Python objects besides tensors; refused (loaded with "
                "weights_only=True so no code from a checkpoint runs)"
            ) from None
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{where} is truncated or not a PyTorch checkpoint ({first or type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise CheckpointError(
            f"{where} is not a checkpoint written by train.py (no state_dict / hyper_parameters)"
        )
    return ckpt


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every leaf of :data:`MODEL_KEYS` that differs."""
    out: list[str] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{name}.{k}")
        elif _plain(a) != _plain(b):
            out.append(f"{name}: {_plain(a)!r} -> {_plain(b)!r}")

    for key in MODEL_KEYS:
        walk(saved.get(key), current.get(key), key)
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v


def check_resumable(path: str | Path, key: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``path`` and check it was written for the model ``hparams`` describe."""
    ckpt = read_checkpoint(path, key)
    diff = model_differences(ckpt["hyper_parameters"], hparams)
    if diff:
        raise CheckpointError(
            f"{key}={str(path)!r} is from a different model config ({'; '.join(diff[:4])}); "
            "resume with the overrides that trained it"
        )
    return ckpt
