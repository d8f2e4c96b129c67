"""Captioned data for cond=text (data/captions.py): sidecar .txt files in image folders and
dataset zips, a "captions" table in dataset.json, the embedded captioned MNIST; a sample's
caption picked by its own seed; a missing caption one message naming the file."""

import json
import zipfile

import numpy as np
import pytest
import torch
from nvlabs_format import name, random_images, write_dataset
from PIL import Image

from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.captions import TEMPLATES, digit_caption, text_mnist
from diffusionlab.data.datasets import image_folder
from diffusionlab.data.image_archive import ImageArchive
from diffusionlab.data.sampler import PositionedDataset
from diffusionlab.errors import ConfigError

IMAGES = random_images(6, size=8)


def add_members(dest, files: dict) -> None:
    if str(dest).endswith(".zip"):
        with zipfile.ZipFile(dest, "a") as z:
            for k, v in files.items():
                z.writestr(k, v)
    else:
        for k, v in files.items():
            (dest / k).write_text(v)


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_dataset_json_captions_table(tmp_path, kind):
    dest = tmp_path / ("d.zip" if kind == "zip" else "d")
    write_dataset(dest, IMAGES, None, meta=False)
    table = [[name(i), [f"image {i}", f"picture {i}"] if i % 2 else f"image {i}"] for i in range(6)]
    add_members(dest, {"dataset.json": json.dumps({"labels": None, "captions": table})})
    ds = ImageArchive(str(dest), captions=True)
    assert ds.captioned and ds.caption(0, 5) == "image 0"
    assert {ds.caption(1, c) for c in range(4)} == {"image 1", "picture 1"}
    assert not ImageArchive(str(dest)).captioned


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_sidecar_captions_and_a_missing_one(tmp_path, kind):
    dest = tmp_path / ("d.zip" if kind == "zip" else "d")
    write_dataset(dest, IMAGES, None)
    sidecars = {name(i).rsplit(".", 1)[0] + ".txt": f"digit {i}\nnumber {i}\n" for i in range(5)}
    add_members(dest, sidecars)
    with pytest.raises(ConfigError, match=f"image '{name(5)}' has no caption"):
        ImageArchive(str(dest), captions=True)
    add_members(dest, {name(5).rsplit(".", 1)[0] + ".txt": "digit 5"})
    ds = ImageArchive(str(dest), captions=True)
    assert ds.caption(3, 0) == "digit 3" and ds.caption(3, 1) == "number 3"
    assert ds.caption(5, 7) == "digit 5"


def test_image_folder_sidecars(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"grey {i}\n")
    ds = image_folder(str(tmp_path), resolution=8, channels=1, captions=True)
    assert [ds.caption(i) for i in range(3)] == ["grey 0", "grey 1", "grey 2"]
    (tmp_path / "1.txt").write_text("  \n")
    with pytest.raises(ConfigError, match=r"caption file '.*1.txt' is empty"):
        image_folder(str(tmp_path), resolution=8, channels=1, captions=True)
    (tmp_path / "1.txt").unlink()
    with pytest.raises(ConfigError, match=r"'.*1.png' has no caption file '.*1.txt'"):
        image_folder(str(tmp_path), resolution=8, channels=1, captions=True)


def test_text_mnist_captions_name_the_label_in_every_wording():
    ds = text_mnist(resolution=8, num_classes=10)
    assert ds.captioned and len(ds) == len(ds.labels)
    for i in (0, 17, 300):
        y = int(ds.labels[i])
        assert ds.captions(i) == [digit_caption(t, y) for t in TEMPLATES]
    assert ds.caption(0, 1) == f"the digit {int(ds.labels[0])}"
    assert text_mnist(resolution=8).num_classes == 0


def test_a_samples_caption_comes_from_its_seed_in_the_batches():
    ds = text_mnist(resolution=8, num_classes=10)
    keyed = PositionedDataset(ds, seed=3, caption=ds.caption)
    item = keyed[(5, 100)]
    assert len(item) == 4 and item[3]["captions"] in ds.captions(5)
    assert keyed[(5, 100)][3] == item[3]  # the same sample reads the same caption
    wordings = {keyed[(5, p)][3]["captions"] for p in range(200)}
    assert len(wordings) == len(TEMPLATES)  # every wording is seen over positions
    dm = DiffusionDataModule(ds, batch_size=8, num_workers=0, seed=0)
    dm.captions = True
    x, y, seeds, extras = next(iter(dm.train_dataloader()))
    caps = extras["captions"]
    assert x.shape == (8, 1, 8, 8) and len(caps) == 8
    assert all(
        c in [digit_caption(t, int(k)) for t in TEMPLATES] for c, k in zip(caps, y, strict=True)
    )
    assert torch.is_tensor(seeds)
