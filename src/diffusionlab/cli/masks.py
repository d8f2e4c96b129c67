"""Inpainting masks: True where pixels are generated, False where the input is kept.

A mask is a named shape (``left_half``, ``right_half``, ``top_half``, ``bottom_half``,
``centre_box``/``center_box``: the middle half in each direction) or a PNG file of the image's
size whose white pixels (> 127) are generated."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffusionlab.errors import ConfigError

SHAPES = ("left_half", "right_half", "top_half", "bottom_half", "centre_box", "center_box")


def named_mask(name: str, height: int, width: int) -> Tensor:
    """A ``[1, 1, H, W]`` bool mask of the named shape."""
    m = torch.zeros(1, 1, height, width, dtype=torch.bool)
    h2, w2 = height // 2, width // 2
    if name == "left_half":
        m[..., :w2] = True
    elif name == "right_half":
        m[..., w2:] = True
    elif name == "top_half":
        m[..., :h2, :] = True
    elif name == "bottom_half":
        m[..., h2:, :] = True
    elif name in ("centre_box", "center_box"):
        m[..., height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    else:
        raise ValueError(name)
    return m


def load_mask(spec: str, height: int, width: int, key: str = "mask") -> Tensor:
    """``spec`` as a ``[1, 1, H, W]`` bool mask: a name from :data:`SHAPES` or a PNG path."""
    if spec in SHAPES:
        return named_mask(spec, height, width)
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}={spec!r} is neither a mask name ({', '.join(SHAPES)}) nor an image file"
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            grey = torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8)
            size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{key}={spec!r} is not a readable image ({e})") from None
    if size != (width, height):
        raise ConfigError(
            f"{key}={spec!r} is {size[0]}x{size[1]}; the model's images are {width}x{height}"
        )
    mask = grey.reshape(1, 1, height, width) > 127
    if not bool(mask.any()):
        raise ConfigError(f"{key}={spec!r} has no white pixel: nothing to inpaint")
    return mask
