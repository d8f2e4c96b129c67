"""NVlabs edm / edm2 pickles (written in their persistent-object format by a test helper) load
onto our networks with the same weights and give EDM Table 1's denoiser; the reader never runs
code from a pickle."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from diffusionlab.errors import CheckpointError, ConfigError
from diffusionlab.interop import is_pretrained, read_pretrained
from diffusionlab.interop.nvlabs_pickle import PersistentRecord, UnsafePickleError, read_pickle
from diffusionlab.sampling.checkpoint import load_guide, load_module
from diffusionlab.sampling.generator import DiffusionGenerator

from .nvlabs_writer import Persistent, precond, write_pickle
from .tiny_pickles import CONFIGS, SMALL, tiny_network, write_tiny


def reference_denoiser(name: str, net, x: torch.Tensor, sigma: torch.Tensor, labels):
    """EDM Table 1 (and edm2's Precond) by hand: D = c_skip x + c_out F(c_in x; c_noise)."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    kind = CONFIGS[name][0]
    if kind in ("EDMPrecond", "Precond"):
        sd = 0.5
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), s.log() / 4
    elif kind == "VPPrecond":
        c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt()
        s32 = s.float()  # VPPrecond computes c_noise in float32 (up to 999: rounding shows)
        c_noise = 999 * (((0.1**2 + 2 * 19.9 * (1 + s32**2).log()).sqrt() - 0.1) / 19.9)
    else:  # VEPrecond
        c_skip, c_out, c_in, c_noise = torch.ones_like(s), s, torch.ones_like(s), (0.5 * s).log()
    f = net((c_in * x.double()).float(), c_noise.flatten().float(), labels)
    return c_skip * x.double() + c_out * f.double()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pickle_loads_onto_our_network_with_the_same_weights(name, tmp_path):
    path, net = write_tiny(name, tmp_path)
    assert is_pretrained(path)
    module = load_module(str(path), torch.device("cpu"))
    ours = module.ema.net.state_dict()
    assert ours.keys() == net.state_dict().keys()
    assert all(torch.equal(v, ours[k]) for k, v in net.state_dict().items())
    ch, label_dim = CONFIGS[name][5], CONFIGS[name][4]
    assert list(module.data_shape) == [ch, 8, 8] and module.label_dim == label_dim
    g = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(3, ch, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.7, 40.0])
    labels = torch.eye(10)[[1, 4, 7]] if label_dim else None
    with torch.no_grad():
        got = module.ema(x, sigma, class_labels=labels)
        want = reference_denoiser(name, net, x, sigma, labels)
    # float32 rounding of F, times c_out (40 for VP / VE at sigma 40)
    assert (got.double() - want).abs().amax(dim=(1, 2, 3)).div(
        sigma.double().clamp(min=1)
    ).max() < 2e-5
    assert (want - x.double()).abs().mean() > 0.1  # the network matters at these sigmas


def test_ranges_and_records(tmp_path):
    """generate.py's grid ends for each preconditioning; what each pickle records of itself."""
    lo_hi = {}
    for name in ("edm_ddpmpp", "vp_ddpmpp", "ve_ncsnpp"):
        m = load_module(str(write_tiny(name, tmp_path)[0]), torch.device("cpu"))
        lo_hi[name] = (m.schedule.sigma_min, m.schedule.sigma_max)
        assert m.sample_dtype == torch.float64  # EDM's generate.py samples in float64
    assert lo_hi == {
        "edm_ddpmpp": (0.002, 80.0),
        "vp_ddpmpp": (0.002, 80.0),
        "ve_ncsnpp": (0.02, 80.0),
    }
    edm = read_pretrained(tmp_path / "edm_ddpmpp.pkl")
    assert edm.info["dataset"]["path"] == "cifar10-32x32.zip" and edm.info["class"] == "EDMPrecond"
    assert edm.hparams["model"]["augment_dim"] == 9 and edm.hparams["sampler"]["nfe"] == 35
    edm2 = read_pretrained(write_tiny("edm2", tmp_path)[0])
    assert edm2.info["kimg"] == 2048 and edm2.info["ema_std"] == 0.13
    assert edm2.hparams["ema"]["sigma_rels"] == [0.13] and edm2.info["use_fp16"]
    assert edm2.hparams["model"]["logvar_channels"] == 128 and edm2.sample_dtype == torch.float32
    vae = edm2.info["vae"]
    assert vae["name"] == "stabilityai/sd-vae-ft-mse"
    std, mean = torch.tensor([4.17, 4.62, 3.71, 3.28]), torch.tensor([5.81, 3.25, 0.12, -2.15])
    torch.testing.assert_close(torch.tensor(vae["scale"]), 0.5 / std)
    torch.testing.assert_close(torch.tensor(vae["bias"]), -mean * 0.5 / std)


def test_edm2_logvar_head_and_latent_decoder(tmp_path, monkeypatch):
    monkeypatch.delenv("DL_VAE_DIR", raising=False)
    path, net = write_tiny("edm2", tmp_path)
    module = load_module(str(path), torch.device("cpu"))
    x, c_noise = torch.randn(2, 4, 8, 8), torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(
            module.ema.net(x, c_noise, return_logvar=True)[1],
            net(x, c_noise, return_logvar=True)[1],
        )
    # a latent model samples without its VAE; decoding names the folders it looks in
    gen = DiffusionGenerator.from_module(module, {"name": "euler", "nfe": 2})
    with pytest.raises(ConfigError, match="sd-vae-ft-mse"):
        gen.generate([0])


def test_unconditional_guide_and_sampling(tmp_path):
    """EDM2 guides a class-conditional model with an unconditional one; both sample seeded."""
    main = load_module(str(write_tiny("edm_ddpmpp", tmp_path)[0]), torch.device("cpu"))
    guide = load_guide(str(write_tiny("vp_ddpmpp", tmp_path)[0]), main)
    assert guide.label_dim == 0 and main.label_dim == 10
    gen = DiffusionGenerator.from_module(main, {"name": "heun", "nfe": 5}, 2.0, True, guide)
    a, b = gen.generate([0, 1]), gen.generate([1])
    assert a.dtype == torch.float64 and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:], b, rtol=1e-3, atol=1e-3)  # per-seed noise and labels


class _RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": _RunsCode()}))
    with pytest.raises(UnsafePickleError, match=r"refuses the global (posix|os|nt)\.system"):
        load_module(str(bad), torch.device("cpu"))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": eval}))  # builtins.eval as a global
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_pickle(evil)
    assert not (tmp_path / "pwned").exists()


def test_embedded_source_is_never_executed(tmp_path):
    """A persistent record carries its module's source; reading keeps it as text only."""
    sentinel = tmp_path / "executed"
    src = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    record = Persistent("EDMPrecond", {"_modules": {}, "_init_kwargs": {}}, module_src=src)
    path = write_pickle(tmp_path / "src.pkl", {"ema": record})
    data = read_pickle(path)
    assert isinstance(data["ema"], PersistentRecord) and data["ema"].module_src == src
    assert not sentinel.exists()


def test_clear_errors_for_what_is_not_a_supported_network(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a network pickle"):
        load_module(str(garbage), torch.device("cpu"))
    other = write_pickle(
        tmp_path / "other.pkl", {"ema": Persistent("StyleGAN", {"_init_kwargs": {}})}
    )
    with pytest.raises(CheckpointError, match="'StyleGAN' is not supported"):
        load_module(str(other), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(str(tmp_path / "missing.pkl"), torch.device("cpu"))
    # weights that do not fit the recorded architecture: named, not a stack trace
    net = tiny_network("edm_ddpmpp")
    kw = dict(img_resolution=8, img_channels=3, label_dim=10, model_type="SongUNet", **SMALL)
    kw.update(augment_dim=9, model_channels=32)
    broken = write_pickle(tmp_path / "broken.pkl", {"ema": precond("EDMPrecond", net, kw)})
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_module(str(broken), torch.device("cpu"))


def test_sigma_range_schedule_keeps_the_base_mapping():
    from diffusionlab.diffusion.schedules import VPSchedule
    from diffusionlab.interop.schedules import SigmaRange

    base = VPSchedule()
    s = SigmaRange(base, 0.002, 80.0)
    sig = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(s.t_of_sigma(sig), base.t_of_sigma(sig))
    torch.testing.assert_close(s.sigma(s.t_of_sigma(sig)), sig)
    assert (s.sigma_min, s.sigma_max) == (0.002, 80.0) and base.sigma_max > 150
    assert math.isclose(
        float(s.sigma(torch.tensor(s.t_max, dtype=torch.float64))), 80.0, rel_tol=1e-12
    )
