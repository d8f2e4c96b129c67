"""Snapshots of power-function EMA profiles and the post-hoc EMA built from them (EDM2 App. C).

During training with ``ema=power`` each profile is saved every ``ema.snapshot_every`` steps to
``<run>/ema_snapshots/step_<step>_sigma_rel_<s>.pt`` (rank 0, atomic). :func:`reconstruct`
combines them into the EMA of any other ``sigma_rel`` at the last snapshot's step, and
:func:`write_reconstruction` stores it as a training checkpoint whose EMA weights are replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.training.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from diffusionlab.training.ema_power import sigma_rel_to_gamma, solve_coefficients

log = logging.getLogger(__name__)

SNAPSHOT_FOLDER = "ema_snapshots"


def snapshot_path(folder: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(folder) / f"step_{step:08d}_sigma_rel_{sigma_rel:.4f}.pt"


def save_snapshots(
    folder: str | Path,
    step: int,
    images_seen: int,
    sigma_rels: list[float],
    gammas: list[float],
    profiles: list[nn.Module],
) -> None:
    """One file per profile: step, images seen, sigma_rel, gamma, the EMA denoiser's state_dict
    and which of its entries are parameters (the rest are buffers, copied, not averaged)."""
    io = AtomicCheckpointIO()
    for sigma_rel, gamma, ema in zip(sigma_rels, gammas, profiles, strict=True):
        state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
        payload = {
            "step": int(step),
            "images_seen": int(images_seen),
            "sigma_rel": float(sigma_rel),
            "gamma": float(gamma),
            "param_names": [name for name, _ in ema.named_parameters()],
            "state_dict": state,
        }
        io.save_checkpoint(payload, snapshot_path(folder, step, sigma_rel))


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file says about itself (its weights are read when combined)."""

    path: Path
    step: int
    images_seen: int
    sigma_rel: float
    gamma: float


def _load(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"EMA snapshot {str(path)!r} is unreadable ({type(e).__name__})"
        ) from None
    if not isinstance(data, dict) or not {"step", "gamma", "state_dict", "param_names"} <= set(
        data
    ):
        raise CheckpointError(f"{str(path)!r} is not an EMA snapshot written by train.py ema=power")
    return data


def read_snapshots(folder: str | Path, key: str = "snapshots") -> list[Snapshot]:
    """The snapshots in ``folder`` by step then sigma_rel; at least two are needed."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"{key}={str(folder)!r} is not a folder of EMA snapshots (train with ema=power "
            "ema.snapshot_every=N to write <run>/ema_snapshots/)"
        )
    snaps = []
    for path in sorted(root.glob("step_*_sigma_rel_*.pt")):
        data = _load(path)
        snaps.append(
            Snapshot(
                path,
                int(data["step"]),
                int(data.get("images_seen", 0)),
                float(data["sigma_rel"]),
                float(data["gamma"]),
            )
        )
    if len(snaps) < 2:
        raise ConfigError(
            f"{key}={str(folder)!r} holds {len(snaps)} EMA snapshot(s); reconstruction needs at "
            "least 2 (two profiles, or one profile at two steps)"
        )
    return sorted(snaps, key=lambda s: (s.step, s.sigma_rel))


def reconstruct(
    snapshots: list[Snapshot], sigma_rels: list[float], key: str = "sigma_rel"
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """EMA state_dicts of ``sigma_rels`` at the last snapshot's step: parameters are the
    least-squares combination of the snapshots' (EDM2 App. C.2, in float64), buffers are the last
    snapshot's. Returns the state_dicts and the coefficients ``[n_snapshots, n_out]``."""
    gammas = [sigma_rel_to_gamma(float(s), key) for s in sigma_rels]
    last = max(s.step for s in snapshots)
    coefs = solve_coefficients(
        [s.step for s in snapshots], [s.gamma for s in snapshots], [last] * len(gammas), gammas
    )
    sums: list[dict[str, torch.Tensor]] = [{} for _ in gammas]
    reference: dict[str, Any] | None = None
    for i, snap in enumerate(snapshots):
        data = _load(snap.path)
        if reference is None:
            reference = data
        elif set(data["state_dict"]) != set(reference["state_dict"]):
            raise CheckpointError(
                f"EMA snapshot {str(snap.path)!r} holds other weights than "
                f"{str(snapshots[0].path)!r}: the folder mixes runs of different models"
            )
        for name in data["param_names"]:
            w = data["state_dict"][name].double()
            for j, out in enumerate(sums):
                out[name] = out[name] + coefs[i, j] * w if name in out else coefs[i, j] * w
        if snap.step == last:
            reference = data
    assert reference is not None
    states = []
    for out in sums:
        state = {
            k: out[k].to(v.dtype) if k in out else v.clone()
            for k, v in reference["state_dict"].items()
        }
        states.append(state)
    return states, coefs


def write_reconstruction(
    ckpt: str | Path,
    ckpt_key: str,
    ema_state: dict[str, torch.Tensor],
    sigma_rel: float,
    snapshots: list[Snapshot],
    coefs: np.ndarray,
    out: Path,
) -> Path:
    """The training checkpoint ``ckpt`` with its sampling EMA (``ema.*``) replaced by
    ``ema_state``, the other tracked profiles dropped and ``hyper_parameters.ema`` saying which
    EMA it holds; the reconstruction's settings are kept under ``ema_reconstruction``."""
    state = read_checkpoint(ckpt, ckpt_key)
    weights = state["state_dict"]
    own = {k.removeprefix("ema."): v for k, v in weights.items() if k.startswith("ema.")}
    if set(own) != set(ema_state) or any(own[k].shape != v.shape for k, v in ema_state.items()):
        raise CheckpointError(
            f"{ckpt_key}={str(ckpt)!r} does not fit the EMA snapshots in "
            f"{str(snapshots[0].path.parent)!r} (other weight names or shapes): pass the "
            "checkpoint of the run that wrote them"
        )
    kept = {k: v for k, v in weights.items() if not k.startswith(("ema.", "ema_profiles."))}
    kept.update({f"ema.{k}": v for k, v in ema_state.items()})
    state["state_dict"] = kept
    state["hyper_parameters"]["ema"] = {
        "_target_": "diffusionlab.training.ema.PowerEMA",
        "sigma_rels": [float(sigma_rel)],
        "snapshot_every": 0,
        "snapshot_dir": None,
    }
    state["ema_reconstruction"] = {
        "sigma_rel": float(sigma_rel),
        "gamma": sigma_rel_to_gamma(float(sigma_rel)),
        "step": max(s.step for s in snapshots),
        "snapshots": [s.path.name for s in snapshots],
        "coefficients": [float(c) for c in coefs],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(state, out)
    log.info("sigma_rel=%g from %d snapshots -> %s", sigma_rel, len(snapshots), out)
    return out


def reconstruction_path(out_dir: str | Path, sigma_rel: float) -> Path:
    return Path(out_dir) / f"ema_{sigma_rel:.4g}.ckpt"


def write_reconstructions(
    ckpt: str | Path,
    snapshots_dir: str | Path,
    sigma_rels: list[float],
    out_dir: str | Path,
    keys: tuple[str, str, str] = ("ckpt", "snapshots", "sigma_rel"),
) -> list[Path]:
    """``<out_dir>/ema_<sigma_rel>.ckpt`` for every ``sigma_rels``: ``ckpt`` with the EMA rebuilt
    from the snapshots in ``snapshots_dir``. ``keys`` name the three settings in errors."""
    ckpt_key, snaps_key, sigma_key = keys
    snapshots = read_snapshots(snapshots_dir, snaps_key)
    states, coefs = reconstruct(snapshots, sigma_rels, sigma_key)
    return [
        write_reconstruction(
            ckpt, ckpt_key, state, s, snapshots, coefs[:, j], reconstruction_path(out_dir, s)
        )
        for j, (s, state) in enumerate(zip(sigma_rels, states, strict=True))
    ]
