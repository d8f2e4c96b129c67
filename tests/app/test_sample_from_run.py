"""sample.py draws what training showed: ``from_run=<run>`` draws a training grid again from its
record, byte for byte, and by default samples with the checkpoint's own sampler."""

from hydra import compose, initialize_config_dir

from diffusionlab.cli.sample import checkpoint_sampler, sample
from diffusionlab.cli.train import train
from diffusionlab.config import CONF_DIR
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.checkpoint import load_module

from .helpers import compose_train, fast_overrides, run_app


def _compose_sample(overrides, tmp_path=None):
    out = [f"paths.output_dir={tmp_path / 'job'}"] if tmp_path else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="sample", overrides=[*overrides, *out])


def test_sample_from_run_redraws_the_training_grids_bitwise(tmp_path):
    run = tmp_path / "run"
    overrides = [
        *fast_overrides(tmp_path),
        "trainer.max_steps=4",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.guidance=2.5",
        "callbacks.sample_grid.guide_at=0.25",
        # the grid's own sampler: inherits edm from the run, with its own NFE and churn
        "callbacks.sample_grid.sampler.nfe=4",
        "+callbacks.sample_grid.sampler.options.S_churn=5",  # the CLI adds the +
    ]
    train(compose_train(overrides, run))
    samples = run / "samples"
    assert (samples / "step_000004_autoguided.png").is_file()

    # the run folder: its newest grid, the autoguided one, through the real command line
    out = tmp_path / "again"
    res = run_app("sample.py", [f"from_run={run}", f"outdir={out}", f"paths.log_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "grid.png").read_bytes() == (samples / "step_000004_autoguided.png").read_bytes()
    assert "is identical to" in res.stdout + res.stderr

    # one PNG: the unguided grid of an earlier step (its own checkpoint step_000002.ckpt)
    cfg = _compose_sample(
        [f"from_run={samples / 'step_000002.png'}", f"outdir={tmp_path / 'plain'}"], tmp_path
    )
    sample(cfg)
    assert (tmp_path / "plain" / "grid.png").read_bytes() == (
        samples / "step_000002.png"
    ).read_bytes()

    # the record holds what the grid drew with: the inherited sampler with the grid's own keys
    module = load_module(str(run / "checkpoints" / "last.ckpt"), "cpu")
    stored = module.hparams.sampler
    assert stored["name"] == "edm" and stored["nfe"] == 3
    # sample.py's default sampler is the checkpoint's own; a key set changes only that key
    default = checkpoint_sampler(module, _compose_sample([]).sampler)
    assert default == stored
    nfe9 = checkpoint_sampler(module, _compose_sample(["sampler.nfe=9"]).sampler)
    assert nfe9 == {**stored, "nfe": 9}
    heun = checkpoint_sampler(module, _compose_sample(["sampler=heun"]).sampler)
    assert heun["name"] == "heun" and heun["nfe"] == 35

    bad = _compose_sample(
        [f"from_run={run}", f"ckpt={run / 'checkpoints' / 'last.ckpt'}"], tmp_path
    )
    try:
        sample(bad)
    except ConfigError as e:
        assert "leave ckpt=null" in str(e)
    else:
        raise AssertionError("from_run with ckpt= must be refused")
