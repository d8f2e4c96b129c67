"""Every process-wide RNG state (torch CPU/CUDA, numpy, Python), per rank, for exact resume.

Training noise is per sample (``data/sampler.py``); these states matter for whatever still draws
from the global generators, such as network dropout. States are stored as tensors and plain
Python values so that checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def collect_rng_states() -> dict[str, Any]:
    """This process's RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set this process's RNG states from ``collect_rng_states()``'s output."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """The RNG states of every rank, in rank order (a collective call under DDP)."""
    states = collect_rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [states]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, states)
    return out


def restore_rank_rng_states(per_rank: list[dict[str, Any]], rank: int) -> None:
    """Restore rank ``rank``'s saved states; with another world size, keep the seeded ones."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(per_rank) != world:
        log.warning(
            "checkpoint holds RNG states of %d ranks, this run has %d: not restored",
            len(per_rank),
            world,
        )
        return
    restore_rng_states(per_rank[rank])
