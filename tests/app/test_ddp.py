"""DDP on CPU (gloo): two processes inside a Hydra multirun (ddp_spawn); two simulated nodes."""

from omegaconf import OmegaConf

from .helpers import fast_overrides, run_app, run_two_nodes


def test_ddp_spawn_inside_multirun(tmp_path):
    # EDM2's net + uncertainty-weighted loss: DDP fails if any parameter goes without a gradient.
    args = [
        "-m",
        "trainer=ddp_cpu",
        *fast_overrides(tmp_path, callbacks=False),
        "model=unet_tiny,unet_edm2_tiny",
        "loss=edm2",
    ]
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


def test_two_simulated_nodes_with_gloo(tmp_path):
    """Multi-node DDP as SLURM or torchrun would start it: one process per node, NODE_RANK 0/1."""
    errors = run_two_nodes(
        lambda rank: [
            *fast_overrides(tmp_path / f"node{rank}", callbacks=False),
            "trainer=cpu",
            "+trainer.strategy=ddp",
            "trainer.num_nodes=2",
            "trainer.devices=1",
        ]
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in errors[1]
    # rank 0 alone writes metrics (Lightning loggers are rank-zero only)
    (metrics,) = (tmp_path / "node0").rglob("metrics.csv")
    assert "train/loss" in metrics.read_text().splitlines()[0]
    assert not list((tmp_path / "node1").rglob("metrics.csv"))
