"""Images to score that are not generated here: a folder of image files as uint8 RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusionlab.data.datasets import IMAGE_SUFFIXES
from diffusionlab.errors import ConfigError


def load_images(folder: str, resolution: int) -> torch.Tensor:
    """Every image in ``folder`` as uint8 RGB [N, 3, H, W] (sorted by name)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(folder).expanduser()
    files = (
        sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if root.is_dir()
        else []
    )
    if not files:
        raise ConfigError(
            f"images={folder!r} is not a folder of images ({', '.join(IMAGE_SUFFIXES)})"
        )
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ConfigError(
                f"images={folder!r}: {p.name!r} is not a readable image ({e})"
            ) from None
        if arrays[-1].shape[:2] != (resolution, resolution):
            raise ConfigError(
                f"images={folder!r}: {p.name!r} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}; "
                f"every image must be {resolution}x{resolution}"
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
