"""The sampler spec (built once from config, yields its grid, runs its sampler) and the generator's
condition seam: a new condition kind is one subclass, nothing in the generator changes."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion import samplers as S
from diffusionlab.diffusion.analytic import Gaussian
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import Condition, conditioned
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec


def test_from_config_fills_defaults_and_round_trips():
    spec = SamplerSpec.from_config(OmegaConf.create({"name": "dpmpp_2m", "nfe": 10}))
    assert (spec.name, spec.nfe, spec.discretization, spec.noise) == (
        "dpmpp_2m",
        10,
        "karras",
        "per_seed",
    )
    assert SamplerSpec.from_config(None) == SamplerSpec() and SamplerSpec().name == "heun"
    edm = SamplerSpec.from_config(OmegaConf.load(Path(CONF_DIR) / "sampler" / "edm.yaml"))
    assert dict(edm.options) == {
        "S_churn": 40.0,
        "S_tmin": 0.05,
        "S_tmax": 50.0,
        "S_noise": 1.003,
        "noise_every_step": False,
    }
    assert SamplerSpec.from_config(edm.to_dict()) == edm and hash(edm) == hash(edm)
    assert pickle.loads(pickle.dumps(edm)) == edm == copy.deepcopy(edm)  # DDP spawn pickles it
    assert edm.sampler().stochastic and not spec.sampler().stochastic
    with pytest.raises(TypeError):
        edm.options["S_churn"] = 0.0  # frozen, options included
    with pytest.raises(ConfigError, match=r"callbacks.fid.sampler has unknown keys \['steps'\]"):
        SamplerSpec.from_config({"name": "heun", "steps": 5}, key="callbacks.fid.sampler")


def test_the_spec_yields_the_grid_and_runs_the_sampler_as_the_samplers_do():
    g = Gaussian(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 0.3)
    schedule = get_schedule("edm")
    spec = SamplerSpec(name="dpmpp_2m", nfe=7, discretization="logsnr")
    sigmas = spec.sigmas_for(schedule)
    assert torch.equal(sigmas, S.sigmas_for_nfe(schedule, "dpmpp_2m", 7, "logsnr"))
    noise = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = S.sample(g, schedule, noise, sampler="dpmpp_2m", nfe=7, discretization="logsnr")
    assert torch.equal(spec.sample(g, schedule, noise), want)
    # a learned grid stored with the spec (as a checkpoint holds it) is used as it is
    learned = SamplerSpec.from_config(
        {**spec.to_dict(), "discretization": "learned", "sigmas": sigmas.tolist()}
    )
    assert torch.equal(learned.sigmas_for(schedule), sigmas)


def test_check_names_the_key():
    schedule = get_schedule("edm")
    with pytest.raises(ConfigError, match="sampler=pc: sampler 'pc' with n_corrector=1 needs nfe"):
        SamplerSpec(name="pc", nfe=1).check(schedule)
    with pytest.raises(ConfigError, match="sweep.samplers=heun: unknown noise kind 'nope'"):
        SamplerSpec(noise="nope").check(schedule, "sweep.samplers")
    with pytest.raises(ConfigError, match="unknown options"):
        SamplerSpec(name="euler", options={"eta": 1}).check(schedule)
    SamplerSpec(name="euler", nfe=3).check(schedule)


# ------------------------------------------------------------------ a new condition kind
@dataclass(frozen=True)
class MeanShift(Condition):
    """A toy condition kind: a scalar mean of the data; null (unconditional) is mean 0."""

    kind: str = "mean"

    def draw(self, generator, device):
        return torch.cat([torch.rand(1, generator=g, device=device) for g in generator.generators])

    def fixed(self, value, n, device):
        return torch.full((n,), float(value), device=device)

    def encode(self, values):
        return values.double()[:, None]

    def network_inputs(self, encoded):
        return {"mean": encoded}


VAR = 0.25


def shifted_gaussian(x, sigma, mean=None):
    """The exact denoiser of N(mean, VAR I) data (N(0, VAR I) without a mean)."""
    m = 0.0 if mean is None else mean
    k = (VAR / (VAR + sigma.double() ** 2))[:, None]
    return m + k * (x - m)


def test_a_new_condition_kind_slots_into_the_generator():
    cond = MeanShift()
    spec = SamplerSpec(name="heun", nfe=31)

    def generator(guidance: float) -> DiffusionGenerator:
        denoise = conditioned(shifted_gaussian, cond)
        return DiffusionGenerator(denoise, get_schedule("edm"), (2,), cond, spec, guidance)

    seeds = list(range(400))
    x = generator(1.0).generate(seeds, class_label=0.5).double()
    assert abs(float(x.mean()) - 0.5) < 0.05 and abs(float(x.var()) - VAR) < 0.05
    # classifier-free guidance against the kind's null input: mean w * 0.5
    guided = generator(2.0).generate(seeds, class_label=0.5).double()
    assert abs(float(guided.mean()) - 1.0) < 0.05
    # conditions drawn per seed, so images do not depend on batching
    gen = generator(1.0)
    together = gen.generate(seeds[:6])
    alone = torch.cat([gen.generate([s]) for s in seeds[:6]])
    torch.testing.assert_close(together, alone)
    assert gen.num_classes == 0  # not class labels: torch-fidelity sees an unconditional model
