"""Generating many seeds on N processes: each takes its share of the seeds not yet written, in
batches, in step with the others (``diffusionlab.distributed.lockstep``), and writes its own
files; rank 0 then builds what needs all of them (grid, npz). An image depends on its seed only,
so the files equal those of one process, and a rerun that skips the written ones equals an
uninterrupted run."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from diffusionlab.distributed import (
    all_gather_objects,
    broadcast_object,
    gather_rows,
    lockstep,
    rank_and_world,
)
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.writer import SampleFolder
from diffusionlab.stopping import Stopped

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What a sampling run did: images each process made (``made[rank]``), images found already
    written and skipped, the seeds asked for, and the wall-clock ``seconds`` the processes
    generated for (from their common start to the last batch). ``samples`` holds every sample
    (gathered, in seed order) when nothing is kept per seed (``png=false`` or 2-D data)."""

    total: int
    skipped: int = 0
    made: list[int] = field(default_factory=list)
    seconds: float = 0.0
    samples: Tensor | None = None

    @property
    def written(self) -> int:
        return self.skipped + sum(self.made)

    @property
    def images_per_s(self) -> float:
        """Images made per second of generation, all processes together."""
        return sum(self.made) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """``2 processes made 64 images (32 + 32), 0 already written were skipped; 12.0 s,
        5.33 images/s``."""
        n = len(self.made)
        each = " + ".join(str(m) for m in self.made) if n > 1 else ""
        return (
            f"{n} process{'es' if n > 1 else ''} made {sum(self.made)} image"
            f"{'s' if sum(self.made) != 1 else ''}{f' ({each})' if each else ''}, "
            f"{self.skipped} already written were skipped; "
            f"{self.seconds:.1f} s, {self.images_per_s:.3g} images/s"
        )


def labels_of(
    generator: DiffusionGenerator,
    seeds: Sequence[int],
    class_label: int | None,
    fixed: Tensor | None,
    batch_size: int,
) -> Tensor | None:
    """The condition value of every seed as sampling draws it (after its noise, from its own
    generator), without running the sampler; ``fixed`` per-seed labels win. None when
    unconditional."""
    if generator.condition is None:
        return None
    if fixed is not None:
        return fixed.cpu()
    out = []
    for s in range(0, len(seeds), batch_size):
        _, lab, _ = generator.seeded_inputs(seeds[s : s + batch_size], class_label)
        out.append(lab.cpu())
    return torch.cat(out)


def write_samples(
    generator: DiffusionGenerator,
    seeds: Sequence[int],
    folder: SampleFolder,
    batch_size: int,
    class_label: int | None = None,
    fixed_labels: Tensor | None = None,
    keep_files: bool = True,
    progress: bool = True,
) -> Tally:
    """Generate one sample per seed, this process's share, in batches of ``batch_size``.

    With ``keep_files`` every image goes to its PNG as soon as its batch is done and seeds whose
    PNG exists are skipped (resume); otherwise nothing is written here and ``Tally.samples``
    holds every sample, gathered in seed order on every process. ``fixed_labels`` gives each
    seed (by position) its class; else ``class_label`` or each seed's own draw. A stop signal or a
    failure in any process ends all of them within one batch (``Stopped`` / ``PeerFailed``)."""
    rank, world = rank_and_world()
    seeds = list(seeds)
    done = broadcast_object(folder.written(seeds) if keep_files and rank == 0 else set())
    todo = [i for i, s in enumerate(seeds) if s not in done]
    mine = todo[rank::world]
    rows: list[Tensor] = []
    made = [0]
    bar = tqdm(total=len(mine), desc="sampling", unit="img", disable=not progress or rank != 0)

    def work(positions: list[int]) -> None:
        batch = [seeds[i] for i in positions]
        if fixed_labels is None:
            noise, lab, gen = generator.seeded_inputs(batch, class_label)
        else:  # a fixed label draws nothing from the per-seed generators; then the given ones
            noise, _, gen = generator.seeded_inputs(batch, 0)
            lab = fixed_labels[positions].to(noise.device)
        x = generator.sample_images(noise, lab, gen).cpu()
        if keep_files:
            folder.write(batch, x)
        else:
            rows.append(x)
        made[0] += len(batch)
        bar.update(len(batch))

    tally = Tally(len(seeds), len(done))
    start = time.perf_counter()  # every process leaves the broadcast above together
    try:
        lockstep(mine, batch_size, work)
    except Stopped as e:  # every process is here (lockstep agreed): count, then say so
        bar.close()
        tally.seconds = time.perf_counter() - start
        tally.made = all_gather_objects(made[0])
        left = tally.total - tally.written
        raise e.because(
            f"stopped with {tally.written} of {tally.total} images in {folder.outdir} "
            f"({tally.summary()})"
            + (
                f"; the same command writes the other {left}, and the grid / npz"
                if keep_files
                else "; nothing is kept per seed (png=false), so a rerun starts over"
            )
        ) from None
    bar.close()
    tally.seconds = time.perf_counter() - start  # lockstep's last agreement: all are done
    tally.made = all_gather_objects(made[0])
    if not keep_files:
        shape = tuple(generator.shape) if generator.decode is None else None
        local = torch.cat(rows) if rows else _empty(generator, shape)
        tally.samples = gather_rows(local, torch.tensor(mine, dtype=torch.long), len(seeds))
    return tally


def _empty(generator: DiffusionGenerator, shape: tuple[int, ...] | None) -> Tensor:
    """No rows (a process with nothing to do): the shape of one sample, from a single draw when
    a decoder decides it."""
    if shape is None:
        return generator.generate([0])[:0].cpu()
    return torch.empty((0, *shape))
