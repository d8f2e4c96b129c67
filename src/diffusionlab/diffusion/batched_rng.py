"""Counter-based per-sample random numbers, drawn for the whole batch on its own device.

Row ``i`` of every draw is a pure function of ``(keys[i], stream, element index)`` (the idea of
counter-based generators, Salmon et al. 2011), so a sample's sigma, noise, augmentation and
dropout masks do not depend on the batch it is in, and a draw costs the same few kernels at any
batch size. The 32 random bits of element ``j`` of row ``i`` in ``stream`` are::

    x = (j * stride_i  XOR  offset_i  XOR  T(stream))  mod 2^32,    bits = P(x)

with ``offset_i`` the low 32 bits of the 63-bit key, ``stride_i = 2 * (key >> 32) + 1`` (odd, so
``j -> x`` is a bijection: a row never repeats a counter), ``T(stream) = P(stream)`` and ``P`` a
3-round xorshift-multiply permutation of the 32-bit integers with near-ideal avalanche (bias
0.0213, constants ``[16 236f7153 12 33cd8663 15 3e06b66b 16]`` from C. Wellons'
hash-prospector). Keys must be well mixed (``diffusion/seeds.py``: sample seeds are, user seeds go
through :func:`~diffusionlab.diffusion.seeds.mix_seeds`).

Exactness: the integers live in int64 lanes and stay below 2^63 (``j < 2^31``, ``stride < 2^32``;
the multipliers are below 2^30 and multiply values below 2^32), shifts only meet non-negative
numbers, so every device computes the same bits, with no reliance on overflow behaviour.
Uniforms are ``(bits >> 8) * 2^-24`` (exact in float32). Normals use Box-Muller on consecutive
pairs: ``r = sqrt(-2 log(1 - u_2k))``, ``z_2k + i z_2k+1 = r exp(2 pi i u_2k+1)`` (float32,
tails cut at 5.77). Those transcendental functions are each device's own: CPU and CUDA agree on
the bits and uniforms exactly and on normals to a few float32 ulps (docs/randomness.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from diffusionlab.diffusion.seeds import mix_seeds

MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x236F7153, 0x33CD8663, 0x3E06B66B)
_SHIFTS = (12, 15, 16)  # after each multiply; the first xorshift is by 16
_MAX_ELEMENTS = (1 << 31) - 1  # per row and stream: keeps j * stride < 2^63
_UNIFORM = 2.0**-24


def hash32(x: Tensor) -> Tensor:
    """The permutation ``P`` on an int64 tensor of values in [0, 2^32) (a new tensor)."""
    x = x ^ (x >> 16)
    for m, s in zip(_MULTIPLIERS, _SHIFTS, strict=True):
        x.mul_(m).bitwise_and_(MASK32)
        x ^= x >> s
    return x


def hash32_int(x: int) -> int:
    """``P`` on one Python integer in [0, 2^32) (the reference for :func:`hash32`)."""
    x ^= x >> 16
    for m, s in zip(_MULTIPLIERS, _SHIFTS, strict=True):
        x = (x * m) & MASK32
        x ^= x >> s
    return x


class BatchedGenerator:
    """Per-sample random numbers for a batch, computed on ``device`` in a constant number of
    kernels. ``keys``: one well-mixed 63-bit integer per row (a tensor, e.g. the batch's seeds
    already on the device, or a sequence).

    Named draws (:meth:`uniform`, :meth:`normal`, :meth:`dropout`) take an explicit stream. The
    ``torch``-like calls (:meth:`rand`, :meth:`randn`, :meth:`randn_like`) take streams 0, 1, 2,
    ... in call order, as ``StackedRandomGenerator`` advances its generators, so samplers and
    losses use either through ``noise.randn_like``.
    """

    def __init__(self, keys: Tensor | Sequence[int], device: torch.device | str | None = None):
        if isinstance(keys, Tensor):
            keys = keys.to(device=device, dtype=torch.int64, non_blocking=True)
        else:
            keys = torch.tensor([int(k) for k in keys], dtype=torch.int64, device=device)
        if keys.ndim != 1:
            raise ValueError(f"keys must be one integer per row, got shape {tuple(keys.shape)}")
        self.device = keys.device
        self.offset = (keys & MASK32)[:, None]
        self.stride = ((keys >> 32) << 1 | 1)[:, None]
        self.calls = 0

    @classmethod
    def from_seeds(
        cls, seeds: Sequence[int], device: torch.device | str | None = None
    ) -> BatchedGenerator:
        """A generator for user seeds (0, 1, 2, ...): each is mixed by SplitMix64 first."""
        return cls(mix_seeds(seeds), device=device)

    def __len__(self) -> int:
        return self.offset.shape[0]

    # ------------------------------------------------------------------ named streams
    def bits(self, shape: Sequence[int], stream: int) -> Tensor:
        """``[B, *shape]`` int64 random 32-bit integers of ``stream``."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n > _MAX_ELEMENTS:
            raise ValueError(f"a draw holds at most {_MAX_ELEMENTS} numbers per row, not {n}")
        if not 0 <= stream <= MASK32:
            raise ValueError(f"stream {stream} outside [0, 2^32)")
        return _counter_bits(self.offset, self.stride, hash32_int(stream), n).view(
            len(self), *shape
        )

    def uniform(self, shape: Sequence[int], stream: int) -> Tensor:
        """``[B, *shape]`` float32 uniforms on [0, 1), multiples of 2^-24."""
        return (self.bits(shape, stream) >> 8).to(torch.float32).mul_(_UNIFORM)

    def normal(self, shape: Sequence[int], stream: int) -> Tensor:
        """``[B, *shape]`` float32 standard normals (Box-Muller on consecutive pairs)."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        h = self.bits((pairs, 2), stream) >> 8
        # 1 - u in (0, 1]: the radius is finite, 0 when u = 0
        r = (16777216 - h[..., 0]).to(torch.float32).mul_(_UNIFORM).log_().mul_(-2.0).sqrt_()
        theta = h[..., 1].to(torch.float32).mul_(2.0 * math.pi * _UNIFORM)
        z = torch.view_as_real(torch.polar(r, theta)).view(len(self), 2 * pairs)
        return (z if n == 2 * pairs else z[:, :n]).reshape(len(self), *shape)

    def dropout(self, x: Tensor, p: float, stream: int) -> Tensor:
        """``x`` (``[B, ...]``) with each element zeroed with probability ``p`` (to 2^-16) and
        the rest scaled by ``1 / (1 - p)`` (inverted dropout, Srivastava et al. 2014). Element
        ``2k`` reads the low and ``2k + 1`` the high 16 bits of counter ``k``: half the integer
        work of one counter per element."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch size {x.shape[0]} != number of keys {len(self)}")
        if p >= 1:
            return torch.zeros_like(x)
        n = math.prod(x.shape[1:])
        if (n + 1) // 2 > _MAX_ELEMENTS:
            raise ValueError(f"a dropout mask holds at most {2 * _MAX_ELEMENTS} per row, not {n}")
        if not 0 <= stream <= MASK32:
            raise ValueError(f"stream {stream} outside [0, 2^32)")
        args = (self.offset, self.stride, hash32_int(stream), (n + 1) // 2, round(p * 65536.0))
        keep = _fused_keep_mask(*args) if _use_fused(x) else _keep_mask(*args)
        keep = keep.view(len(self), -1)[:, :n].reshape(x.shape)
        return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p))

    # ------------------------------------------------------------------ torch-like calls
    def _next_stream(self) -> int:
        self.calls += 1
        return self.calls - 1

    def _check(self, size: Sequence[int]) -> None:
        if size[0] != len(self):
            raise ValueError(f"batch size {size[0]} != number of keys {len(self)}")

    def rand(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniforms of ``size`` (``size[0]`` = batch) from the next stream."""
        self._check(size)
        return self.uniform(size[1:], self._next_stream()).to(dtype)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Normals of ``size`` (``size[0]`` = batch) from the next stream."""
        self._check(size)
        return self.normal(size[1:], self._next_stream()).to(dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

    def randint(self, high: int, size: Sequence[int]) -> Tensor:
        """Integers in ``[0, high)`` of ``size`` (``size[0]`` = batch) from the next stream:
        ``(bits * high) >> 32`` (Lemire 2019; bias below ``high / 2^32``), e.g. class labels."""
        self._check(size)
        if not 0 < high < 1 << 31:
            raise ValueError(f"high={high} outside [1, 2^31)")
        return (self.bits(size[1:], self._next_stream()) * high) >> 32


def _counter_bits(offset: Tensor, stride: Tensor, salt: int, n: int) -> Tensor:
    """``[B, n]`` int64: ``P((j * stride XOR offset XOR salt) mod 2^32)`` for ``j < n`` (the
    module docstring's formula; ``salt = P(stream)``)."""
    j = torch.arange(n, device=offset.device, dtype=torch.int64)
    x = j * stride
    x ^= offset ^ salt
    x &= MASK32
    return hash32(x)


def _keep_mask(offset: Tensor, stride: Tensor, salt: int, pairs: int, threshold: int) -> Tensor:
    """``[B, 2 * pairs]`` bool dropout keep-mask: element ``2k`` from the low, ``2k + 1`` from the
    high 16 bits of counter ``k``, kept when at least ``threshold`` (``p * 2^16``)."""
    h = _counter_bits(offset, stride, salt, pairs)
    return torch.stack([(h & 0xFFFF) >= threshold, (h >> 16) >= threshold], dim=-1).view(
        offset.shape[0], -1
    )


# In eager mode the mask is ~25 elementwise kernels over int64 counters, memory-bound on a GPU
# (on an H200, unet_ddpmpp at batch 128 in bf16 took 831 img/s with per-sample dropout against
# 981 without); compiled, it is one kernel that writes the bool mask (same integers, same bits).
_FUSED: dict[str, object] = {}


def _use_fused(x: Tensor) -> bool:
    """Fuse the mask on CUDA, outside an enclosing ``torch.compile`` (which fuses it anyway)."""
    return x.is_cuda and _FUSED.get("fn") is not False and not torch.compiler.is_compiling()


def _fused_keep_mask(*args: object) -> Tensor:
    """:func:`_keep_mask` through ``torch.compile`` (dynamic shapes: one compilation for every
    layer); falls back to eager for good, with a warning, where compiling fails."""
    fn = _FUSED.get("fn")
    if fn is None:
        fn = _FUSED["fn"] = torch.compile(_keep_mask, dynamic=True)
    try:
        return fn(*args)
    except Exception as e:  # no Triton, an unsupported device: the eager kernels are exact too
        warnings.warn(f"dropout masks run unfused ({type(e).__name__}: {e})", stacklevel=3)
        _FUSED["fn"] = False
        return _keep_mask(*args)


_ACTIVE: ContextVar[BatchedGenerator | None] = ContextVar("batched_generator", default=None)


@contextmanager
def use_generator(generator: BatchedGenerator | None) -> Iterator[BatchedGenerator | None]:
    """Within the block, networks draw dropout and label-dropout masks from ``generator``
    (``networks/layers.py``); outside any block they use the process RNG."""
    token = _ACTIVE.set(generator)
    try:
        yield generator
    finally:
        _ACTIVE.reset(token)


def active_generator() -> BatchedGenerator | None:
    """The generator of the enclosing :func:`use_generator` block, if any."""
    return _ACTIVE.get()
