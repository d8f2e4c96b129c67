"""The counter-based per-sample generator (diffusion/batched_rng.py): its bits against a scalar
reference, the closed-form moments of its uniforms and normals, a Kolmogorov-Smirnov test,
independence across elements, keys and streams, batch independence, a kernel count that does
not grow with the batch, and the two sampling noise kinds."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from diffusionlab.diffusion import batched_rng as R
from diffusionlab.diffusion import discretizations as dz
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.batched_rng import (
    MASK32,
    BatchedGenerator,
    hash32,
    hash32_int,
)
from diffusionlab.diffusion.noise import StackedRandomGenerator, noise_generator, randn_like
from diffusionlab.diffusion.seeds import mix_seeds, sample_seed

KEYS = [sample_seed(7, p) for p in range(64)]


def reference_bits(key: int, stream: int, j: int) -> int:
    """The documented formula, in Python integers (no tensors, no overflow anywhere)."""
    stride = 2 * (key >> 32) + 1
    x = ((j * stride) ^ (key & MASK32) ^ hash32_int(stream)) & MASK32
    return hash32_int(x)


def test_hash_is_the_published_permutation():
    """hash32 on tensors = the scalar reference; the scalar one is a bijection (checked on a
    2^16 block plus strided samples) with the published triple32-class constants."""
    x = torch.arange(0, 1 << 32, 65521, dtype=torch.int64)
    assert hash32(x).tolist() == [hash32_int(v) for v in x.tolist()]
    block = [hash32_int(v) for v in range(1 << 16)]
    assert len(set(block)) == len(block) and max(block) <= MASK32
    # hash(0) = 0 for this construction; every other value moves
    assert hash32_int(0) == 0 and hash32_int(1) != 1


def test_bits_match_the_reference_formula():
    gen = BatchedGenerator(KEYS[:5])
    for stream in (0, 1, 2**31 + 7):
        bits = gen.bits((3, 7), stream).view(5, -1)
        for i, key in enumerate(KEYS[:5]):
            assert bits[i].tolist() == [reference_bits(key, stream, j) for j in range(21)]


def test_no_int64_overflow_at_the_limits():
    """The largest key and element index keep every product below 2^63 (the bound the exact
    cross-device claim rests on), and bigger draws are refused."""
    key = (1 << 63) - 1
    stride = 2 * (key >> 32) + 1
    assert ((1 << 31) - 2) * stride < 1 << 63
    assert MASK32 * max(0x236F7153, 0x33CD8663, 0x3E06B66B) < 1 << 63
    gen = BatchedGenerator([key])
    assert gen.bits((4,), 3)[0].tolist() == [reference_bits(key, 3, j) for j in range(4)]
    with pytest.raises(ValueError, match="at most"):
        gen.bits((1 << 31,), 0)


def test_uniform_moments_and_grid():
    u = BatchedGenerator(KEYS).uniform((4096,), 11).double().flatten()
    n = u.numel()
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).round())  # multiples of 2^-24, exact in float32
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/180


def test_normal_moments_and_kolmogorov_smirnov():
    z = BatchedGenerator(KEYS).normal((3, 32, 32), 1).double().flatten()
    n = z.numel()  # 196,608
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(stats.skew(z.numpy())) < 4 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z.numpy())) < 4 * math.sqrt(24 / n)
    ks = stats.kstest(z.numpy(), "norm")
    assert ks.pvalue > 1e-3, ks
    # the tails are Box-Muller's with 24-bit uniforms: cut at sqrt(2 * 24 ln 2) = 5.77
    assert z.abs().max() <= math.sqrt(48 * math.log(2)) + 1e-6


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_independence_across_elements_keys_and_streams():
    """Correlations within 4.5 standard errors of 0 (1 / sqrt(n)): adjacent and strided
    elements, neighbouring rows, streams of a row, and keys one bit apart (the permutation's
    avalanche, not the key mixing, separates those)."""
    gen = BatchedGenerator(KEYS)
    z = gen.normal((8192,), 5)
    n = z[:, :-1].numel()
    bound = 4.5 / math.sqrt(n)
    assert abs(_corr(z[:, :-1], z[:, 1:])) < bound  # neighbouring elements
    assert abs(_corr(z[:, :-64], z[:, 64:])) < bound
    assert abs(_corr(z[:-1], z[1:])) < bound  # neighbouring rows
    assert abs(_corr(z, gen.normal((8192,), 6))) < bound  # streams
    assert abs(_corr(z, gen.normal((8192,), 5 + 2**31))) < bound
    near = BatchedGenerator([k ^ 1 for k in KEYS]).normal((8192,), 5)  # keys 1 bit apart
    assert abs(_corr(z, near)) < bound
    high = BatchedGenerator([k ^ (1 << 40) for k in KEYS]).normal((8192,), 5)
    assert abs(_corr(z, high)) < bound
    # pairs of consecutive uniforms fill the unit square evenly (16 x 16 cells, chi-square)
    u = gen.uniform((2 * 8192,), 9).view(-1, 2)
    cells = (u * 16).long()
    counts = torch.bincount(cells[:, 0] * 16 + cells[:, 1], minlength=256).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert stats.chi2.sf(chi2, 255) > 1e-3


def test_a_row_is_the_same_in_any_batch():
    """Row i depends on its key only: alone, in another batch, reordered; bitwise."""
    gen = BatchedGenerator(KEYS[:12])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    other = BatchedGenerator([KEYS[i] for i in perm])
    alone = BatchedGenerator(KEYS[5:6])
    for draw in (
        lambda g: g.bits((2, 5), 4),
        lambda g: g.uniform((7,), 3),
        lambda g: g.normal((1, 9, 9), 2),
        lambda g: g.dropout(torch.ones(len(g), 3, 5), 0.3, 8),  # odd: 15 per row
    ):
        full = draw(gen)
        assert torch.equal(draw(other), full[perm])
        assert torch.equal(draw(alone), full[5:6])


def test_prefixes_do_not_depend_on_the_draw_size():
    gen = BatchedGenerator(KEYS[:4])
    assert torch.equal(gen.normal((5,), 1)[:, :4], gen.normal((4,), 1))
    assert torch.equal(gen.bits((9,), 1)[:, :3], gen.bits((3,), 1))


def test_torch_like_calls_take_streams_in_order():
    gen = BatchedGenerator(KEYS[:3])
    a, b = gen.randn((3, 4)), gen.rand((3, 2), dtype=torch.float64)
    assert torch.equal(a, gen.normal((4,), 0)) and torch.equal(b, gen.uniform((2,), 1).double())
    replay = BatchedGenerator(KEYS[:3])
    assert torch.equal(randn_like(torch.zeros(3, 4), replay), a)
    with pytest.raises(ValueError, match="batch size 2 != number of keys 3"):
        gen.randn((2, 4))


def test_dropout_keeps_one_minus_p_and_rescales():
    x = torch.ones(64, 100, 10)
    out = BatchedGenerator(KEYS).dropout(x, 0.13, 0)
    kept = out != 0
    assert abs(kept.double().mean() - 0.87) < 4 * math.sqrt(0.13 * 0.87 / x.numel())
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.87))
    assert not BatchedGenerator(KEYS).dropout(x, 1.0, 0).any()


def test_fused_dropout_mask_is_the_eager_mask(monkeypatch):
    """The compiled mask (used on CUDA) computes the same integers: bitwise the eager mask here on
    the CPU's compiler, for two shapes through one dynamic compilation."""
    gen = BatchedGenerator(KEYS[:3])
    fused = torch.compile(R._keep_mask, dynamic=True)
    for stream, pairs, p in ((7, 4000, 0.13), (9, 777, 0.3)):
        args = (gen.offset, gen.stride, hash32_int(stream), pairs, round(p * 65536))
        assert torch.equal(fused(*args), R._keep_mask(*args))


def test_fused_dropout_falls_back_to_eager_once(monkeypatch):
    """Where compiling fails the masks stay exact (eager), with one warning, and later calls do
    not retry; CPU tensors never take the fused path."""
    x = torch.ones(4, 3, 5)
    assert not R._use_fused(x)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no triton")

        return run

    monkeypatch.setattr(R, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(R, "_use_fused", lambda x: R._FUSED.get("fn") is not False)
    gen = BatchedGenerator(KEYS[:4])
    with pytest.warns(UserWarning, match="dropout masks run unfused .*no triton"):
        out = gen.dropout(x, 0.3, 5)
    assert R._FUSED["fn"] is False
    monkeypatch.setattr(R, "_use_fused", lambda x: False)
    assert torch.equal(out, gen.dropout(x, 0.3, 5))


def test_draws_cost_the_same_kernels_at_any_batch():
    """The generator's work is a fixed list of tensor operations: as many at batch 8 as at
    512 (here: counted ATen calls), unlike one generator call per sample."""

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for batch in (8, 512):
        keys = torch.tensor([sample_seed(0, p) for p in range(batch)])
        with Count() as c:
            gen = BatchedGenerator(keys)
            gen.rand((batch,))
            gen.randn((batch, 3, 32, 32))
        counts.append(c.n)
    assert counts[0] == counts[1] <= 70, counts


# ---------------------------------------------------------------- sampling noise kinds
@pytest.mark.parametrize("kind", ["per_seed", "batched"])
@pytest.mark.parametrize("name", ["euler_ancestral", "edm", "dpmpp_2m_sde"])
def test_noise_kinds_make_samples_batch_independent(kind, name):
    gauss = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    sig = dz.karras(S.steps_for_nfe(name, 8), 0.002, 80.0)
    gen = noise_generator(kind, range(6))
    noise = gen.randn((6, 3), dtype=torch.float64)
    full = S.get_sampler(name)(gauss, noise * 80.0, sig, generator=gen)
    part_gen = noise_generator(kind, range(3, 6))
    part_noise = part_gen.randn((3, 3), dtype=torch.float64)
    assert torch.equal(part_noise, noise[3:])
    part = S.get_sampler(name)(gauss, part_noise * 80.0, sig, generator=part_gen)
    assert torch.equal(part, full[3:])


def test_noise_kinds_are_which_generator():
    per_seed = noise_generator("per_seed", [3, 4])
    assert isinstance(per_seed, StackedRandomGenerator)  # EDM's: torch.Generator per seed
    edm = torch.randn(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(per_seed.randn((2, 5))[1], edm)
    batched = noise_generator("batched", [3, 4])
    assert isinstance(batched, BatchedGenerator)
    assert torch.equal(batched.randn((2, 5)), BatchedGenerator(mix_seeds([3, 4])).normal((5,), 0))
    with pytest.raises(ValueError, match="unknown noise kind 'philox'; valid: per_seed, batched"):
        noise_generator("philox", [0])


def test_randint_is_uniform_over_classes_and_per_sample():
    """Class labels for conditional sampling: every class about equally often (chi-square),
    the next stream in order, row i the same in any batch."""
    gen = BatchedGenerator(KEYS)
    labels = gen.randint(10, (64, 500))
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10
    counts = torch.bincount(labels.flatten(), minlength=10).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert stats.chi2.sf(chi2, 9) > 1e-3
    assert torch.equal(labels, (gen.bits((500,), 0) * 10) >> 32)  # first call: stream 0
    part = BatchedGenerator(KEYS[10:20]).randint(10, (10, 500))
    assert torch.equal(part, labels[10:20])
