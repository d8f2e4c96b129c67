"""Sampler settings wherever a sampler is used: every option in its YAML (so
``sampler.options.eta=0.5`` needs no ``+``), the learned-grid file key, specs stored under the old
key name."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from diffusionlab.config import CONF_DIR
from diffusionlab.diffusion.learned_grids import _full
from diffusionlab.diffusion.samplers import SAMPLERS
from diffusionlab.sampling.spec import SamplerSpec, inherit_sampler


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_yaml_lists_every_option(name):
    node = yaml.safe_load((Path(CONF_DIR) / "sampler" / f"{name}.yaml").read_text())
    assert node["name"] == name and "sigmas_file" in node and "grid" not in node
    assert list(node["options"]) == SAMPLERS[name].option_names
    params = inspect.signature(SAMPLERS[name].fn).parameters
    for key, value in node["options"].items():  # same type as the sampler's default
        assert type(value) is type(params[key].default) or {type(value), float} == {int, float}
    SamplerSpec.from_config(node).sampler()  # the YAML's values are valid options


def test_documented_sampler_options_override_without_plus():
    cases = {
        "dpmpp_2m_sde": {"eta": 0.5},
        "euler_ancestral": {"eta": 0.5, "s_noise": 1.1},
        "unipc": {"variant": "bh1"},
    }
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, options in cases.items():
            overrides = [
                f"sampler={name}",
                *(f"sampler.options.{k}={v}" for k, v in options.items()),
            ]
            spec = SamplerSpec.from_config(
                compose(config_name="evaluate", overrides=overrides).sampler
            )
            shipped = yaml.safe_load((Path(CONF_DIR) / "sampler" / f"{name}.yaml").read_text())
            assert dict(spec.options) == {**shipped["options"], **options}
            spec.sampler()


def test_a_spec_stored_with_the_old_grid_key_reads_as_sigmas_file(tmp_path):
    spec = SamplerSpec.from_config({"name": "euler", "nfe": 5, "grid": None})
    assert spec.sigmas_file is None and "grid" not in spec.to_dict()


def test_a_grid_fitted_with_default_options_fits_them_spelled_out():
    assert _full("dpmpp_2m", {}) == _full("dpmpp_2m", {"eta": 0.0, "s_noise": 1.0})
    assert _full("dpmpp_2m", {"eta": 0.5}) != _full("dpmpp_2m", {})


def test_inherit_keeps_what_the_node_leaves_null():
    base = SamplerSpec.from_config(
        {"name": "edm", "nfe": 35, "options": {"S_churn": 40.0, "S_noise": 1.003}}
    )
    assert inherit_sampler(base, None) == base.to_dict()
    out = inherit_sampler(base, {"name": None, "nfe": 18, "options": {"S_churn": 0.0}})
    assert out["name"] == "edm" and out["nfe"] == 18
    assert out["options"] == {"S_churn": 0.0, "S_noise": 1.003}
    # another sampler stands alone: nothing of edm's options reaches heun
    assert inherit_sampler(base, {"name": "heun", "nfe": None, "options": {}}) == {"name": "heun"}
    assert SamplerSpec.from_config(inherit_sampler(base, {"name": "heun"})).nfe == 35
    # a stored learned grid stays only while the grid's sampler, NFE and options stay
    learned = {**base.to_dict(), "discretization": "learned", "sigmas": [2.0, 1.0, 0.0]}
    assert inherit_sampler(learned, {"noise": "batched"})["sigmas"] == [2.0, 1.0, 0.0]
    assert "sigmas" not in inherit_sampler(learned, {"nfe": 9})
    # the node's own list of sigmas stays (sample.py "+sampler.sigmas=[80,0.821]" on a checkpoint)
    own = {"discretization": "list", "sigmas": [80.0, 0.821]}
    assert inherit_sampler(learned, own)["sigmas"] == [80.0, 0.821]
    assert inherit_sampler(base, {**own, "nfe": 2})["sigmas"] == [80.0, 0.821]
    assert inherit_sampler({"name": "euler", "grid": None}, {})["sigmas_file"] is None
