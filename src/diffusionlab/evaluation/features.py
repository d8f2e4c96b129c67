"""Features of real images and of seeded samples, sharded over processes and gathered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm import tqdm

from diffusionlab.distributed import gather_rows, rank_and_world, shard
from diffusionlab.sampling.images import to_uint8_rgb

if TYPE_CHECKING:
    from diffusionlab.sampling.generator import DiffusionGenerator

Features = dict[str, Tensor]


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images: Tensor) -> Features:
    """One batch of uint8 RGB images -> ``{layer: float32 [B, d]}`` on the CPU."""
    device = next(extractor.parameters()).device
    out = extractor.convert_features_tuple_to_dict(extractor(images.to(device)))
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _sharded(
    n: int,
    batch_size: int,
    make_images: Callable[[list[int]], Tensor],
    extractor: FeatureExtractorBase,
    desc: str,
    progress: bool,
) -> Features:
    """Run ``make_images(indices)`` over this process's share of ``range(n)`` in batches, extract
    features, and gather every process's rows in index order."""
    rank, world = rank_and_world()
    mine = shard(n, rank, world)
    parts: dict[str, list[Tensor]] = {}
    bar = tqdm(
        total=len(mine), desc=desc, unit="img", disable=not progress or rank != 0, leave=False
    )
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        for k, v in extract(extractor, make_images(idx)).items():
            parts.setdefault(k, []).append(v)
        bar.update(len(idx))
    bar.close()
    indices = torch.tensor(mine, dtype=torch.long)
    if not parts:  # more processes than samples
        dims = {k: v.shape[1:] for k, v in extract(extractor, make_images([0])).items()}
        parts = {k: [torch.empty((0, *d), dtype=torch.float32)] for k, d in dims.items()}
    return {k: gather_rows(torch.cat(v), indices, n) for k, v in parts.items()}


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
) -> Features:
    """Features of one sample per seed: sample i depends on ``seeds[i]`` only, so the result does
    not depend on ``batch_size`` or on how many processes share the work."""
    seeds = list(seeds)

    def make(idx: list[int]) -> Tensor:
        return to_uint8_rgb(generator.generate([seeds[i] for i in idx], class_label))

    return _sharded(len(seeds), batch_size, make, extractor, "sampling", progress)
