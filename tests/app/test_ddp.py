"""DDP on CPU (gloo): two processes inside a Hydra multirun, via ddp_spawn."""

from omegaconf import OmegaConf

from .helpers import fast_overrides, run_app


def test_ddp_spawn_inside_multirun(tmp_path):
    args = ["-m", "trainer=ddp_cpu", "schedule=vp,edm", *fast_overrides(tmp_path, callbacks=False)]
    res = run_app("train.py", args)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = list((tmp_path / "train" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert cfg.trainer.strategy == "ddp_spawn" and cfg.trainer.devices == 2
        assert (job / "metrics.csv").is_file()
    # no stray run directories from re-launched children
    assert not (tmp_path / "train" / "runs").exists()
