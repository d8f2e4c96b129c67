"""Per-sample-seeded noise, so images do not depend on batch size or world size (EDM generate.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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


Generator = torch.Generator | StackedRandomGenerator | None


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x`` from a ``torch.Generator``, a per-sample
    ``StackedRandomGenerator``, or the global RNG when ``generator`` is None."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, StackedRandomGenerator):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(
        x.device
    )


def noise_generator(
    kind: str, seeds: Sequence[int], device: torch.device | str = "cpu"
) -> StackedRandomGenerator:
    """The sampling noise source named by a sampler spec's ``noise``, one stream per sample
    index: ``per_seed`` is one ``torch.Generator`` per seed (EDM generate.py)."""
    if kind == "per_seed":
        return StackedRandomGenerator(seeds, device)
    raise ValueError(f"unknown noise kind {kind!r}; valid: per_seed")
