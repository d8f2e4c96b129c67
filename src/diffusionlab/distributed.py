"""Processes that share one job of the apps (``sample.py``, ``evaluate.py``) and the FID callback:
who started them (torchrun, SLURM's srun, submitit), their process group, the share of the sample
indices each takes, gathering results back in index order, and moving in step.

Moving in step (:func:`together`, :func:`lockstep`): after every batch the processes agree
whether all went well. A process that failed or received a stop signal makes all of them stop
there, with its message, instead of leaving the others blocked in the next collective."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from diffusionlab.stopping import Stopped, requested

log = logging.getLogger(__name__)
T = TypeVar("T")

# a collective waits this long for the slowest process (rank 0 training a feature extractor, a
# slow first batch) before the job fails; failures and stops end it at once (see `together`)
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in its job: global ``rank`` of ``world_size``, ``local_rank`` on
    its node (its GPU), the ``launcher`` that started it and the rendezvous address it implies."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_of(environ: dict[str, str] | None = None) -> Launch:
    """The launch described by the environment: torchrun (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``; also those set by hand), SLURM's srun (``SLURM_*``,
    Lightning's detection and port rule) or submitit's local executor with several tasks; else
    one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return Launch(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), launcher
        )
    if _srun(env):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        nodes = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = env.get("SLURM_JOB_ID", "")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 15000 + int(job[-4:] or 0)
        return Launch(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
            env.get("MASTER_ADDR") or SLURMEnvironment.resolve_root_node_address(nodes),
            port,
        )
    if env.get("SUBMITIT_EXECUTOR") == "local" and int(env.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1:
        job = env.get("SUBMITIT_LOCAL_JOB_ID", "")
        port = (
            int(env["MASTER_PORT"])
            if "MASTER_PORT" in env
            else random.Random(job).randint(20000, 60000)
        )
        return Launch(
            int(env["SUBMITIT_LOCAL_GLOBALID"]),
            int(env["SUBMITIT_LOCAL_NTASKS"]),
            int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            "submitit",
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
        )
    return Launch()


def _srun(env: dict[str, str]) -> bool:
    """A task of ``srun`` with several tasks (Lightning's rule: not an interactive allocation)."""
    return (
        int(env.get("SLURM_NTASKS", 1)) > 1
        and "SLURM_PROCID" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    )


def start_processes(launch: Launch | None = None) -> Launch:
    """Join the job's process group (once; nothing for one process): gloo for CPU tensors and,
    when CUDA is present, NCCL for CUDA tensors, each process on ``cuda:LOCAL_RANK``."""
    launch = launch or launch_of()
    if not launch.distributed or dist.is_initialized():
        return launch
    if launch.master_addr is not None:
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_cuda_index(launch))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=TIMEOUT,
    )
    return launch


def local_cuda_index(launch: Launch | None = None) -> int:
    """The GPU of this process: ``LOCAL_RANK`` among the visible ones (0 when SLURM gives each
    task its own GPU)."""
    launch = launch or launch_of()
    return launch.local_rank % max(torch.cuda.device_count(), 1)


def stop_processes() -> None:
    """Leave the process group (the end of an app)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and the W&B run."""
    return rank_and_world()[0] == 0


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The sample indices process ``rank`` generates: ``rank, rank + W, rank + 2W, ...``."""
    return list(range(rank, n, world_size))


def _device() -> torch.device:
    """Where collectives take their tensors: the CPU with gloo, this process's GPU with NCCL."""
    backend = str(dist.get_backend())
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_max(value: int) -> int:
    """The largest ``value`` over all processes."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable), in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(rows: Tensor, indices: Tensor, n: int) -> Tensor:
    """All processes' ``rows`` (one per sample index in ``indices``; any number per process) as
    one ``[n, ...]`` tensor ordered by index, on every process. Without a process group, just
    reorders."""
    world = rank_and_world()[1]
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    if world == 1:
        out[indices] = rows.cpu()
        return out
    device = _device()
    counts = torch.tensor([rows.shape[0]], dtype=torch.long, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    size = max(int(c.item()) for c in all_counts)
    padded = torch.zeros((size, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    idx = torch.full((size,), -1, dtype=torch.long, device=device)
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


class PeerFailed(RuntimeError):
    """Another process of the job failed; the message is its own."""


_OK, _STOPPED, _FAILED = 0, 1, 2
_inside = threading.local()


@contextmanager
def together() -> Iterator[None]:
    """Run the block on every process, then agree on its outcome: when one process failed, it
    raises its own error and every other :class:`PeerFailed` with that message; when one
    received a stop signal, all raise :class:`~diffusionlab.stopping.Stopped` with it. One small
    collective (two when something went wrong); nothing without a process group.

    The block itself must not run collectives (a process that fails before one would leave the
    others in it); a nested ``together`` is part of the outer block (rank 0 works, the others
    wait in the outer agreement)."""
    if getattr(_inside, "together", False):  # nested: the outer block agrees for both
        yield
        return
    status, what, error = _OK, "", None
    _inside.together = True
    try:
        yield
    except Stopped as e:
        status, what, error = _STOPPED, e.signal, e
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others know)
        status, what, error = _FAILED, f"{type(e).__name__}: {e}", e
    finally:
        _inside.together = False
    if status == _OK and requested():
        status, what = _STOPPED, requested() or ""
    worst = all_max(status)
    if worst == _OK:
        return
    reports = all_gather_objects((status, what))
    rank = next(r for r, (s, _) in enumerate(reports) if s == worst)
    if worst == _FAILED:
        if error is not None and status == _FAILED:
            raise error
        raise PeerFailed(f"process {rank} of {len(reports)} failed: {reports[rank][1]}")
    if isinstance(error, Stopped):
        raise error
    raise Stopped(reports[rank][1])


def lockstep(items: Sequence[T], batch_size: int, work: Callable[[list[T]], None]) -> None:
    """``work(batch)`` over this process's ``items`` in batches of ``batch_size``, all processes
    running the same number of rounds (a process that has run out takes part with no batch) and
    agreeing after each round (:func:`together`): a failure or a stop signal anywhere ends all
    of them within one batch."""
    rounds = all_max(-(-len(items) // batch_size))
    for r in range(rounds):
        batch = list(items[r * batch_size : (r + 1) * batch_size])
        with together():
            if batch and not requested():
                work(batch)
