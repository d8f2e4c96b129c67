"""Per-sample-seeded noise, so images do not depend on batch size or world size (EDM generate.py).

Two kinds (:func:`noise_generator`): ``per_seed``, EDM's ``StackedRandomGenerator`` (one
``torch.Generator`` per image: NVlabs' images for the same seeds), and ``batched``, the
counter-based :class:`~diffusionlab.diffusion.batched_rng.BatchedGenerator` (the whole batch in
a few kernels on the device; other numbers for the same seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator


class StackedRandomGenerator:
    """One ``torch.Generator`` per sample index; ``randn`` draws row i from generator i.

    Sample ``i`` with seed ``seeds[i]`` gets the same noise whatever batch it lands in.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(self.device).manual_seed(int(s) % (1 << 63)) for s in seeds
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} != number of seeds {len(self.generators)}")
        return torch.stack(
            [
                torch.randn(size[1:], generator=g, device=self.device, dtype=dtype)
                for g in self.generators
            ]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

    def randint(self, high: int, size: Sequence[int]) -> Tensor:
        """Integers in ``[0, high)`` of ``size`` (``size[0]`` = batch), row i from generator i
        (EDM generate.py's class labels)."""
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} != number of seeds {len(self.generators)}")
        return torch.stack(
            [
                torch.randint(high, tuple(size[1:]), generator=g, device=self.device)
                for g in self.generators
            ]
        )


Generator = torch.Generator | StackedRandomGenerator | BatchedGenerator | None


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x`` from a ``torch.Generator``, a per-sample
    ``StackedRandomGenerator`` or ``BatchedGenerator``, or the global RNG when ``generator`` is
    None."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, StackedRandomGenerator | BatchedGenerator):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(
        x.device
    )


NOISE_KINDS = ("per_seed", "batched")


def noise_generator(
    kind: str, seeds: Sequence[int], device: torch.device | str = "cpu"
) -> StackedRandomGenerator | BatchedGenerator:
    """The per-image noise source of a sampling run: ``per_seed`` (EDM's one generator per
    seed, the default) or ``batched`` (counter-based, drawn for the batch on ``device``). Both
    give each image the same noise whatever batch it is generated in."""
    if kind == "per_seed":
        return StackedRandomGenerator(seeds, device=device)
    if kind == "batched":
        return BatchedGenerator.from_seeds(seeds, device=device)
    raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
