"""Datasets: ranges, shapes, labels; the image-folder loader on folders the test writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionlab.data import DiffusionDataModule, Toy2D, cifar10, digits, image_folder, mnist
from diffusionlab.data.datasets import split_indices
from diffusionlab.errors import ConfigError


def test_mnist_is_padded_to_32_with_labels():
    ds = mnist(resolution=32)
    assert len(ds) == 5000 and ds.shape == (1, 32, 32)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    # the 2-pixel padding is background (-1)
    assert torch.all(ds.images[:, :, :2, :] == -1.0) and torch.all(ds.images[:, :, :, -2:] == -1.0)
    assert sorted(set(ds.labels.tolist())) == list(range(10))


def test_mnist16_is_the_area_average_of_mnist32():
    big, small = mnist(resolution=32), mnist(resolution=16)
    assert small.shape == (1, 16, 16)
    expected = big.images[:3].reshape(3, 1, 16, 2, 16, 2).mean((3, 5))
    torch.testing.assert_close(small.images[:3], expected)


def test_digits_range_and_values():
    ds = digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8)
    # sklearn digits take integer values 0..16 -> k/8 - 1
    vals = torch.unique(ds.images)
    torch.testing.assert_close(vals, torch.arange(17) / 8.0 - 1.0)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and y == 0


@pytest.mark.parametrize("name", ["swiss_roll", "moons", "8gaussians", "checkerboard"])
def test_toy2d_is_seeded_and_unit_scaled(name):
    a, b = Toy2D(name, size=4000, seed=1), Toy2D(name, size=4000, seed=1)
    torch.testing.assert_close(a.points, b.points)
    assert a.shape == (2,) and a[0][1] == -1
    assert a.points.std(0).min() > 0.5 and a.points.std(0).max() < 1.5


def test_toy2d_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match="checkerboard"):
        Toy2D("spiral")


def _write_folder(root, classes, n_per_class, size=(20, 12), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_image_folder_labels_from_subfolders(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"], 3)
    ds = image_folder(str(tmp_path), resolution=8, channels=3, num_classes=2)
    assert len(ds) == 6 and ds.shape == (3, 8, 8)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


def test_image_folder_constant_image_maps_exactly(tmp_path):
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(tmp_path / "black.png")
    ds = image_folder(str(tmp_path), resolution=4, channels=1)
    assert sorted(ds.images.flatten().unique().tolist()) == [-1.0, 1.0]


def test_image_folder_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        image_folder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no images"):
        image_folder(str(tmp_path))
    _write_folder(tmp_path, ["a", "b"], 1)
    with pytest.raises(ConfigError, match="dataset.num_classes=3"):
        image_folder(str(tmp_path), num_classes=3)


def test_cifar10_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root"):
        cifar10(str(tmp_path), download=False)


def test_datamodule_batches_and_flip():
    dm = DiffusionDataModule(lambda: digits(), batch_size=32, hflip=True)
    x, y, seeds = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    assert seeds.shape == (32,) and seeds.unique().numel() == 32
    with pytest.raises(ConfigError, match="data.batch_size"):
        _ = DiffusionDataModule(lambda: digits(), batch_size=5000).dataset


def test_dataset_split_is_the_evaluation_partition():
    """dataset.split=train / test are the fixed 80 / 20 partition of eval.split: disjoint, whole."""
    full = digits()
    train, test = digits(split="train"), digits(split="test")
    assert len(train) + len(test) == len(full) and len(test) == round(0.2 * len(full))
    idx = split_indices(len(full), "test")
    assert torch.equal(test.images, full.images[idx]) and torch.equal(test.labels, full.labels[idx])
    rest = split_indices(len(full), "train")
    assert not set(idx.tolist()) & set(rest.tolist())
    assert torch.equal(train.images, full.images[rest])


def test_dataset_split_names_its_key():
    with pytest.raises(ConfigError, match="dataset.split='val'"):
        digits(split="val")
