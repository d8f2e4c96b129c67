"""The crop / resize modes of NVlabs' ``dataset_tool.py convert`` (EDM2), pixel for pixel.

Each takes and returns a uint8 array ``[H, W, 3]`` (RGB) or ``[H, W]`` (greyscale):

- ``none``: resize to ``width x height`` with Lanczos when given and different, else unchanged;
- ``center-crop``: the largest centred square, then Lanczos to ``width x height``;
- ``center-crop-wide``: a centred band of the output aspect ratio, Lanczos to ``width x height``,
  pasted in the middle of a black ``width x width`` canvas (None for images that are too small:
  they are left out, as dataset_tool does);
- ``center-crop-dhariwal``: ADM's ImageNet crop (Dhariwal & Nichol 2021, guided-diffusion
  ``center_crop_arr``): halve with a box filter while the short side is at least twice the
  target, bicubic so that the short side is the target, then crop the centre.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from diffusionlab.errors import ConfigError

TRANSFORMS = ("none", "center-crop", "center-crop-wide", "center-crop-dhariwal")

Transform = Callable[[np.ndarray], np.ndarray | None]


def _resize(img: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), resample))


def scale(width: int | None, height: int | None, img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if (width is None or width == w) and (height is None or height == h):
        return img
    return _resize(img, width or w, height or h, Image.Resampling.LANCZOS)


def center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    crop = min(img.shape[:2])
    top, left = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
    img = img[top : (img.shape[0] + crop) // 2, left : (img.shape[1] + crop) // 2]
    return _resize(img, width, height, Image.Resampling.LANCZOS)


def center_crop_wide(width: int, height: int, img: np.ndarray) -> np.ndarray | None:
    band = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or band < height:
        return None
    img = img[(img.shape[0] - band) // 2 : (img.shape[0] + band) // 2]
    img = _resize(img, width, height, Image.Resampling.LANCZOS)
    canvas = np.zeros((width, width, *img.shape[2:]), dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2, :] = img
    return canvas


def center_crop_dhariwal(size: int, img: np.ndarray) -> np.ndarray:
    im = Image.fromarray(img)
    while min(*im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    ratio = size / min(*im.size)
    im = im.resize(tuple(round(x * ratio) for x in im.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def parse_resolution(value: int | str | None, key: str = "resolution") -> tuple[int, int] | None:
    """``64`` -> (64, 64); ``'512x384'`` or ``'512,384'`` -> (width, height); None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = (value, value)
    else:
        parts = str(value).lower().replace(",", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"{key}={value!r}: give an integer (64) or WIDTHxHEIGHT (512x384)")
        size = (int(parts[0]), int(parts[1]))
    if min(size) < 1:
        raise ConfigError(f"{key}={value!r} must be positive")
    return size


def make_transform(name: str | None, size: tuple[int, int] | None) -> Transform:
    """The transform ``name`` (one of :data:`TRANSFORMS`) to ``size = (width, height)``."""
    name = name or "none"
    if name not in TRANSFORMS:
        raise ConfigError(f"transform={name!r}: choose one of {TRANSFORMS}")
    if name == "none":
        w, h = size if size is not None else (None, None)
        return lambda img: scale(w, h, img)
    if size is None:
        raise ConfigError(f"transform={name} needs resolution=... (e.g. resolution=64)")
    w, h = size
    if name == "center-crop":
        return lambda img: center_crop(w, h, img)
    if name == "center-crop-wide":
        return lambda img: center_crop_wide(w, h, img)
    if w != h:
        raise ConfigError(f"transform=center-crop-dhariwal needs a square resolution, not {w}x{h}")
    return lambda img: center_crop_dhariwal(w, img)
