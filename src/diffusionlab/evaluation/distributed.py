"""Sharding sample indices over processes and gathering their features back in index order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The sample indices process ``rank`` generates: ``rank, rank + W, rank + 2W, ...``."""
    return list(range(rank, n, world_size))


def gather_rows(rows: Tensor, indices: Tensor, n: int) -> Tensor:
    """All processes' ``rows`` (one per sample index in ``indices``) as one ``[n, ...]`` tensor
    ordered by index, on every process. Without a process group, just reorders."""
    rank, world = rank_and_world()
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    if world == 1:
        out[indices] = rows.cpu()
        return out
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    per_rank = -(-n // world)
    padded = torch.zeros((per_rank, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    idx = torch.full((per_rank,), -1, dtype=torch.long, device=device)
    idx[: indices.shape[0]] = indices.to(device)
    all_rows = [torch.empty_like(padded) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_idx, idx)
    for r, i in zip(all_rows, all_idx, strict=True):
        keep = i >= 0
        out[i[keep].cpu()] = r[keep].cpu()
    return out


def barrier() -> None:
    """Wait for all processes (no-op without a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
