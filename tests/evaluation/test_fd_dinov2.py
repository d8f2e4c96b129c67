"""FD-DINOv2 in evaluate.py with a tiny randomly initialised DINOv2 written to a temporary file:
the metric beside FID in one pass, its protocol record, the one message for a missing file, and
(``DL_EDM2_PATH``) parity with EDM2's calculate_metrics.py on the same images and network."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from diffusionlab.cli.evaluate import evaluate
from diffusionlab.config import CONF_DIR
from diffusionlab.data import digits
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError
from diffusionlab.evaluation.extractors import DINOV2_LAYER, create_extractor, dinov2_name
from diffusionlab.evaluation.metrics import compute_metrics
from diffusionlab.evaluation.protocol import Protocol
from diffusionlab.files import file_sha256
from diffusionlab.networks.dinov2 import DINOv2
from diffusionlab.sampling.images import to_uint8_rgb

EDM2 = os.environ.get("DL_EDM2_PATH")


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """A one-block ViT-S/14 (a 4x4 position table, resized to 16x16 at 224 px), random weights,
    saved as the official file would be."""
    torch.manual_seed(0)
    model = DINOv2(384, 1, 6, 14, 56)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path


def _write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for i, img in enumerate(to_uint8_rgb(images)[:, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def _evaluate(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", ["dataset=digits", "wandb.mode=disabled", *overrides])
    return evaluate(cfg)


def test_fd_dinov2_beside_fid_with_its_protocol(dinov2_file, tmp_path):
    data = digits()
    # 90 training digits against the 360 of the test split (the reference: DINOv2 at 224 px
    # is the test's cost)
    test = data.images[split_indices(len(data), "train")][::16]
    _write_pngs(test, tmp_path / "real")
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _write_pngs(noise, tmp_path / "noise")
    results = {}
    for name in ("real", "noise"):
        out = tmp_path / f"out_{name}"
        results[name] = _evaluate(
            [
                f"images={tmp_path / name}",
                "eval.split=test",
                "eval.metrics=[fid,fd_dinov2]",
                f"eval.dinov2_weights={dinov2_file}",
                "eval.extractor_steps=50",
                f"eval.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={out}",
            ]
        )
    real, noise = results["real"]["metrics"], results["noise"]["metrics"]
    assert set(real) == {"fid", "fd_dinov2"}
    assert 0 < real["fd_dinov2"] < noise["fd_dinov2"] and real["fid"] < noise["fid"]
    saved = json.loads((tmp_path / "out_real" / "metrics.json").read_text())
    protocol = Protocol.from_dict(saved["protocol"])
    domain, dino = protocol.extractor.split(";")
    assert dino == dinov2_name(dinov2_file) and domain.startswith("dl-domain-")
    assert protocol.extractor_sha256.split(";")[1] == file_sha256(dinov2_file)
    refs, digests = protocol.reference.split(";"), protocol.reference_sha256.split(";")
    assert [file_sha256(r) for r in refs] == digests and len(refs) == 2
    assert protocol.num_samples == 90 and protocol.split == "test"
    with open(tmp_path / "out_real" / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert Protocol.from_row(row) == protocol
    assert float(row["fd_dinov2"]) == pytest.approx(real["fd_dinov2"])


def test_missing_dinov2_file_is_named_in_one_message(tmp_path):
    missing = tmp_path / "weights" / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(ConfigError) as e:
        _evaluate(
            [
                f"images={tmp_path}",
                "eval.metrics=[fid,fd_dinov2]",
                f"eval.dinov2_weights={missing}",
                f"eval.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'out'}",
            ]
        )
    message = str(e.value)
    assert "eval.dinov2_weights" in message and str(missing) in message
    assert "dinov2_vitl14_pretrain.pth" in message and "\n" not in message


EDM2_SCRIPT = """
import pickle, sys
import numpy as np, torch
sys.path.insert(0, {edm2!r})
import calculate_metrics as cm
from diffusionlab.networks.dinov2 import load_dinov2
torch.hub.load = lambda *a, **k: load_dinov2({weights!r}, "w")  # the same network, no fetch
images = torch.load({images!r})
det = cm.DINOv2Detector()
feats = [det(images[i : i + 16]).double() for i in range(0, len(images), 16)]
stats = []
for f in (torch.cat(feats[:2]), torch.cat(feats[2:])):
    mu = f.mean(0)
    sigma = (f.T @ f - mu.ger(mu) * len(f)) / (len(f) - 1)
    stats.append(dict(fd_dinov2=dict(mu=mu.numpy(), sigma=sigma.numpy())))
fd = cm.calculate_metrics_from_stats(stats[0], stats[1], ["fd_dinov2"], verbose=False)
pickle.dump((torch.cat(feats).float(), fd["fd_dinov2"]), open({out!r}, "wb"))
"""


@pytest.mark.parity
@pytest.mark.skipif(not EDM2, reason="set DL_EDM2_PATH to an NVlabs/edm2 checkout")
def test_parity_with_edm2_calculate_metrics(dinov2_file, tmp_path):
    """EDM2's DINOv2Detector (resize_mode='torch') and its FD on the same uint8 images and
    network: equal features, equal FD between two halves of the set."""
    import pickle

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    images[:32] //= 2  # two sets that differ
    torch.save(images, tmp_path / "images.pt")
    script = EDM2_SCRIPT.format(
        edm2=EDM2,
        weights=str(dinov2_file),
        images=str(tmp_path / "images.pt"),
        out=str(tmp_path / "edm2.pkl"),
    )
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=EDM2,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "edm2.pkl", "rb") as f:
        want, fd = pickle.load(f)
    ext = create_extractor(dinov2_name(dinov2_file), dinov2_file)
    with torch.no_grad():
        ours = torch.cat([ext(images[i : i + 16])[0] for i in range(0, 64, 16)])
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    layers = {"fd_dinov2": DINOV2_LAYER}
    got = compute_metrics(
        {DINOV2_LAYER: ours[:32]}, {DINOV2_LAYER: ours[32:]}, layers, ["fd_dinov2"]
    )["fd_dinov2"]
    assert got == pytest.approx(fd, rel=1e-4) and fd > 0
    assert np.isfinite(got)
