"""Features of real images and of seeded samples, sharded over processes and gathered; the
generated ones optionally kept on disk so an interrupted evaluation continues."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm import tqdm

from diffusionlab.distributed import (
    all_gather_objects,
    broadcast_object,
    gather_rows,
    lockstep,
    rank_and_world,
)
from diffusionlab.files import atomic_write, atomic_write_text
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.stopping import Stopped

if TYPE_CHECKING:
    from diffusionlab.sampling.generator import DiffusionGenerator

Features = dict[str, Tensor]
log = logging.getLogger(__name__)


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images: Tensor) -> Features:
    """One batch of uint8 RGB images -> ``{layer: float32 [B, d]}`` on the CPU."""
    device = next(extractor.parameters()).device
    out = extractor.convert_features_tuple_to_dict(extractor(images.to(device)))
    return {k: v.detach().float().cpu() for k, v in out.items()}


class FeatureCache:
    """Features of generated samples kept on disk per batch, so that an interrupted evaluation
    continues where it stopped: ``<root>/<key>/<first seed>_<hash>.pt`` holds ``seeds`` and one
    row per seed of every layer, written atomically (a file that exists is whole). ``record`` is
    everything the features depend on besides the seed (checkpoint, sampler, guidance,
    extractor); its hash is the folder, so other settings never share rows."""

    def __init__(self, root: str | Path, record: dict) -> None:
        text = json.dumps(record, sort_keys=True)
        self.record = record
        self.dir = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]

    def load(self, seeds: Sequence[int]) -> tuple[list[int], Features]:
        """The rows already computed for any of ``seeds``: (their seeds, their features)."""
        wanted = set(seeds)
        got: list[int] = []
        parts: dict[str, list[Tensor]] = {}
        for path in sorted(self.dir.glob("*.pt")) if self.dir.is_dir() else []:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign file: computed again, not trusted
                log.warning("generated features %s unreadable (%s); recomputing", path, e)
                continue
            keep = torch.tensor([int(s) in wanted and int(s) not in got for s in data["seeds"]])
            if not keep.any():
                continue
            got.extend(int(s) for s in data["seeds"][keep])
            for k, v in data["features"].items():
                parts.setdefault(k, []).append(v[keep])
        return got, {k: torch.cat(v) for k, v in parts.items()}

    def write_record(self) -> None:
        """``record.json``: what the rows depend on, for a reader of the folder (one process)."""
        if not (self.dir / "record.json").is_file():
            atomic_write_text(self.dir / "record.json", json.dumps(self.record, indent=2))

    def save(self, seeds: Sequence[int], features: Features) -> None:
        """One batch's rows (any process; the file name is the batch's own)."""
        digest = hashlib.sha256(str(list(seeds)).encode()).hexdigest()[:12]
        path = self.dir / f"{seeds[0]:09d}_{digest}.pt"
        data = {"seeds": torch.tensor(list(seeds)), "features": features}
        atomic_write(path, lambda f: torch.save(data, f))


def _sharded(
    n: int,
    batch_size: int,
    make_images: Callable[[list[int]], Tensor],
    extractor: FeatureExtractorBase,
    desc: str,
    progress: bool,
    cache: FeatureCache | None = None,
    keys: Sequence[int] | None = None,
) -> Features:
    """Run ``make_images(indices)`` over this process's share of ``range(n)`` in batches, in step
    with the other processes (``distributed.lockstep``), extract features, and gather every
    process's rows in index order. With a ``cache`` (``keys``: the seed of each index), rows it
    holds are read instead of computed and every new batch is added to it."""
    rank, world = rank_and_world()
    keys = list(range(n)) if keys is None else list(keys)
    have: dict[int, int] = {}  # index -> row of `cached` (rank 0)
    cached: Features = {}
    if cache is not None:
        found: list[int] = []
        if rank == 0:
            cache.write_record()
            found, cached = cache.load(keys)
        where = {s: r for r, s in enumerate(found)}
        have = {i: where[k] for i, k in enumerate(keys) if k in where}
        done = broadcast_object(sorted(have))
        if rank == 0 and have:
            log.info("%s: %d of %d samples' features kept from an earlier run", desc, len(have), n)
    else:
        done = []
    skip = set(done)
    mine = [i for i in range(n) if i not in skip][rank::world]
    parts: dict[str, list[Tensor]] = {}
    bar = tqdm(
        total=len(mine), desc=desc, unit="img", disable=not progress or rank != 0, leave=False
    )
    count = [0]

    def work(idx: list[int]) -> None:
        feats = extract(extractor, make_images(idx))
        if cache is not None:
            cache.save([keys[i] for i in idx], feats)
        for k, v in feats.items():
            parts.setdefault(k, []).append(v)
        count[0] += len(idx)
        bar.update(len(idx))

    try:
        lockstep(mine, batch_size, work)
    except Stopped as e:
        bar.close()
        made = sum(all_gather_objects(count[0]))
        if cache is None:
            raise
        raise e.because(
            f"stopped {desc} with the features of {len(done) + made} of {n} samples kept in "
            f"{cache.dir}"
        ) from None
    bar.close()
    indices = mine
    if have:  # rank 0 contributes the kept rows with its own
        order = sorted(have)
        for k, v in cached.items():
            parts.setdefault(k, []).insert(0, v[[have[i] for i in order]])
        indices = order + mine
    if not parts:  # more processes than samples
        dims = {k: v.shape[1:] for k, v in extract(extractor, make_images([0])).items()}
        parts = {k: [torch.empty((0, *d), dtype=torch.float32)] for k, d in dims.items()}
    index = torch.tensor(indices, dtype=torch.long)
    return {k: gather_rows(torch.cat(v), index, n) for k, v in parts.items()}


def image_features(
    images: Callable[[list[int]], Tensor],
    n: int,
    extractor: FeatureExtractorBase,
    batch_size: int = 250,
    progress: bool = False,
) -> Features:
    """Features of ``n`` real images; ``images(indices)`` returns them as uint8 RGB NCHW."""
    return _sharded(n, batch_size, images, extractor, "features", progress)


def dataset_images(images: Tensor) -> Callable[[list[int]], Tensor]:
    """Index function over float NCHW images in [-1, 1] returning uint8 RGB."""
    return lambda idx: to_uint8_rgb(images[idx])


def generated_features(
    generator: DiffusionGenerator,
    extractor: FeatureExtractorBase,
    seeds: Sequence[int],
    batch_size: int = 64,
    class_label: int | None = None,
    progress: bool = False,
    cache: FeatureCache | None = None,
) -> Features:
    """Features of one sample per seed: sample i depends on ``seeds[i]`` only, so the result does
    not depend on ``batch_size``, on how many processes share the work, or on which rows a
    ``cache`` already held."""
    seeds = list(seeds)

    def make(idx: list[int]) -> Tensor:
        return to_uint8_rgb(generator.generate([seeds[i] for i in idx], class_label))

    return _sharded(len(seeds), batch_size, make, extractor, "sampling", progress, cache, seeds)
