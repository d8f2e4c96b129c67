"""The seed scheme: every random choice of a training sample comes from ``(seed, global sample
position, stream)``, so a step does not depend on how its batch is split and a resumed run
replays the uninterrupted one (DESIGN.md §5).

Two layers:

- On the host, :func:`sample_seed` (SplitMix64) turns ``(run seed, position, stream)`` into a
  63-bit seed: the data pipeline's streams (``NOISE_STREAM``: the sample's key, ``FLIP_STREAM``:
  its horizontal flip, ``EPOCH_STREAM``: the epoch permutation, keyed by epoch).
- On the training device, :class:`~diffusionlab.diffusion.batched_rng.BatchedGenerator` keyed by
  the sample's key draws everything else in batch. Draws made in call order (sigma, then noise)
  take streams 0, 1, 2, ...; the named streams below sit at 2^31 and above, so they never meet.
"""

from __future__ import annotations

from collections.abc import Iterable

MASK64 = (1 << 64) - 1

# host streams of sample_seed
NOISE_STREAM = 0
FLIP_STREAM = 1
EPOCH_STREAM = 2
CAPTION_STREAM = 16  # data: which of an image's captions a sample reads (docs/conditioning.md)

# named streams of the batched generator (sequential draws use 0, 1, 2, ...)
NAMED_STREAMS = 1 << 31
AUGMENT_UNIFORM_STREAM = NAMED_STREAMS + 0  # data/augment.py: 16 uniforms per sample
AUGMENT_NORMAL_STREAM = NAMED_STREAMS + 1  # data/augment.py: 4 normals per sample
LABEL_DROPOUT_STREAM = NAMED_STREAMS + 2  # networks: classifier-free guidance label dropout
# text and image conditions (training/conditions.py): condition dropout, noise augmentation
COND_DROPOUT_STREAM = NAMED_STREAMS + 16
COND_AUG_LEVEL_STREAM = NAMED_STREAMS + 17
COND_AUG_NOISE_STREAM = NAMED_STREAMS + 18
# diffusion/consistency.py: a pair's noise level (t, or iCT's grid index) and the noise direction
# shared by both points of the pair
CONSISTENCY_SIGMA_STREAM = NAMED_STREAMS + 256
CONSISTENCY_NOISE_STREAM = NAMED_STREAMS + 257
# diffusion/mean_flow.py: whether a sample's pair has r != t (its two times come from the first)
MEANFLOW_RATIO_STREAM = NAMED_STREAMS + 258
DROPOUT_STREAM = NAMED_STREAMS + (1 << 16)  # + the index of the network's dropout layer


def splitmix64(x: int) -> int:
    """SplitMix64 (Steele et al. 2014): one step of the generator, a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, position: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit seed for the random draws of global sample ``position`` in ``stream``."""
    h = splitmix64(int(seed) & MASK64)
    h = splitmix64(h ^ (int(position) & MASK64))
    return splitmix64(h ^ int(stream)) >> 1


def mix_seeds(seeds: Iterable[int]) -> list[int]:
    """Well-mixed 63-bit keys for user seeds (0, 1, 2, ...), as the batched generator needs."""
    return [splitmix64(int(s) & MASK64) >> 1 for s in seeds]
