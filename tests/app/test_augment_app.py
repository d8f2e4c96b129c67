"""``augment=``: the config group sets the network's augment labels, the app trains with them,
user errors name the key, and every command in docs/augmentation.md runs as written."""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from diffusionlab.cli.common import USER_ERRORS, user_message
from diffusionlab.cli.train import build, train

from .helpers import ROOT, compose_train, fast_overrides


def _doc_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "augmentation.md").read_text()
    lines = [ln for b in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in b.splitlines()]
    return [shlex.split(ln)[2:] for ln in lines if ln.startswith("python train.py")]


def test_group_sets_the_model_augment_dim(tmp_path):
    default = compose_train([], tmp_path)
    assert default.augment is None and default.model.augment_dim == 0
    for model in ("unet_tiny", "unet_ddpmpp", "unet_adm", "dit", "unet_edm2"):
        cfg = compose_train([f"model={model}", "augment=edm"], tmp_path)
        assert cfg.model.augment_dim == 9 and cfg.augment.p == 0.12, model


def test_doc_commands_train_with_augment_labels(tmp_path, monkeypatch):
    """Each documented command (plus a few-step tiny run) trains; the labels reach the loss."""
    commands = _doc_commands()
    assert len(commands) == 2
    seen: list[torch.Tensor] = []

    def spy(self, denoiser, x0, class_labels=None, augment_labels=None, generator=None):
        seen.append(augment_labels)
        return original(self, denoiser, x0, class_labels, augment_labels, generator)

    from diffusionlab.diffusion.losses import DiffusionLoss

    original = DiffusionLoss.forward
    monkeypatch.setattr(DiffusionLoss, "forward", spy)
    for i, args in enumerate(commands):
        run = tmp_path / str(i)
        cfg = compose_train([*args, *fast_overrides(run, callbacks=False)], run)
        seen.clear()
        train(cfg)
        dim = int(cfg.model.augment_dim)
        assert len(seen) == 3 and all(s.shape == (16, dim) for s in seen)
        assert any(s.any() for s in seen)  # some images were augmented
    assert [int(compose_train(a, tmp_path).model.augment_dim) for a in commands] == [9, 8]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["augment=edm", "model.augment_dim=0"], "model.augment_dim=0"),
        (["augment=edm", "augment.yflip=0"], "model.augment_dim=8"),
        (["augment=edm", "augment.p=-0.5"], "augment.p=-0.5"),
        (["augment=edm", "dataset=toy2d", "model=mlp_tiny"], "augment=none"),
    ],
)
def test_user_errors_name_the_key(tmp_path, args, key):
    cfg = compose_train([*fast_overrides(tmp_path), *args], tmp_path)
    with pytest.raises(USER_ERRORS) as e:
        build(cfg)
    assert key in user_message(e.value)


def test_a_samples_augmented_loss_does_not_depend_on_its_batch(tmp_path):
    """batch_loss draws each sample's augmentation from its own seed: a sample's loss is the
    same alone or in a batch, and changes when augmentation is on (p=1)."""
    args = [*fast_overrides(tmp_path, callbacks=False), "augment=edm", "augment.p=1"]
    module, datamodule = build(compose_train(args, tmp_path))
    x = torch.stack([datamodule.dataset[i][0] for i in range(6)])
    labels, seeds = torch.zeros(6, dtype=torch.long), torch.arange(100, 106)
    with torch.no_grad():
        whole, _ = module.batch_loss((x, labels, seeds))
        part, _ = module.batch_loss((x[3:5], labels[3:5], seeds[3:5]))
        module.augment_pipe = None
        plain, _ = module.batch_loss((x, labels, seeds))
    torch.testing.assert_close(part, whole[3:5], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain, whole, rtol=1e-3)
