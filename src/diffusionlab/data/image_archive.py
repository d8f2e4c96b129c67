"""``dataset=zip``: NVlabs dataset zips (or folders) read as they are, decoded per sample.

The format of ``dataset_tool.py`` (EDM, EDM2) and of ``dl-dataset convert``: square images
(PNG, or any format PIL reads) of one size, sorted by name, labels in ``dataset.json``. The
resolution and channel count come from the files; set in the config they must agree.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffusionlab.data.archive import CorruptFile, FileIndex
from diffusionlab.data.captions import CAPTION_SUFFIX, captions_from_metadata, sidecar_names
from diffusionlab.data.lazy import LazyDataset, uint8_to_float
from diffusionlab.errors import ConfigError

Image.init()
IMAGE_EXTENSIONS = tuple(sorted(Image.EXTENSION))
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def decode_image(data: bytes, mode: str | None = None) -> np.ndarray:
    """Image bytes -> uint8 array ``[H, W, C]``, converted to ``mode`` (``L`` / ``RGB``) when
    given. Raises :class:`CorruptFile` (without a name: the caller adds it)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptFile(f"is not a readable image ({e})") from None
    if arr.dtype != np.uint8:
        raise CorruptFile(f"has {arr.dtype} pixels; 8-bit images are expected")
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_mode(data: bytes) -> str:
    """``L`` for greyscale files, ``RGB`` for everything else (palette, RGBA, CMYK ...)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return "L" if im.mode in _GREY_MODES else "RGB"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptFile(f"is not a readable image ({e})") from None


class ImageArchive(LazyDataset):
    """The images of a zip or folder in NVlabs' layout, decoded per sample.

    ``resolution`` / ``channels`` None: taken from the first image; set, they must match it.
    ``num_classes`` None: from the labels (``max + 1``, 0 when unlabelled); 0 ignores labels.
    ``captions``: each image's captions (``cond=text``) from a ``captions`` table in
    ``dataset.json`` or, without one, a sidecar ``.txt`` per image (data/captions.py), read per
    sample like the images.
    """

    def __init__(
        self,
        path: str | None,
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        skip_corrupt: bool = False,
        captions: bool = False,
    ) -> None:
        if not path:
            raise ConfigError(
                "dataset.path: a value is required (for dataset=latents, dataset.source.path: "
                "the images the latents encode, which evaluation compares samples with)"
            )
        self.index = FileIndex(path, IMAGE_EXTENSIONS)
        self.path = Path(path)
        self.skip_corrupt = skip_corrupt
        first = self._first_readable()
        if channels not in (None, 1, 3):
            raise ConfigError(f"dataset.channels={channels} must be 1, 3 or null (from the files)")
        self.mode = image_mode(first) if channels is None else ("L" if channels == 1 else "RGB")
        file_mode = image_mode(first)
        if file_mode != self.mode:
            raise ConfigError(
                f"dataset.channels={channels} but the images of dataset.path={str(path)!r} are "
                f"{file_mode} ({self.index.names[0]!r}); leave dataset.channels unset (null) to "
                "take it from the files, or convert them with dl-dataset convert channels=..."
            )
        h, w, c = decode_image(first, self.mode).shape
        if h != w:
            raise ConfigError(
                f"dataset.path={str(path)!r}: {self.index.names[0]!r} is {w}x{h}; images must be "
                "square (dl-dataset convert resolution=... transform=center-crop)"
            )
        if resolution is not None and int(resolution) != h:
            raise ConfigError(
                f"dataset.resolution={resolution} but the images of dataset.path={str(path)!r} are "
                f"{h}x{w} ({self.index.names[0]!r}); the model is built for dataset.resolution: "
                "leave it unset (null) to take it from the files"
            )
        self.shape = (c, h, w)
        self.label_array = None if num_classes == 0 else self.index.labels(num_classes)
        if num_classes and self.label_array is None:
            raise ConfigError(
                f"dataset.num_classes={num_classes} but dataset.path={str(path)!r} has no labels "
                "(dataset.json with labels, or class sub-folders); set dataset.num_classes=0"
            )
        self.num_classes = (
            int(num_classes)
            if num_classes is not None
            else (0 if self.label_array is None else int(self.label_array.max()) + 1)
        )
        self.caption_table = self.text_index = self.text_of = None
        if captions:
            self._index_captions()

    def _index_captions(self) -> None:
        """The captions table of ``dataset.json``, else the sidecar ``.txt`` of every image."""
        where = f"dataset.path={str(self.path)!r}"
        names = list(self.index.names)
        self.caption_table = captions_from_metadata(self.index.metadata_bytes, names, where)
        if self.caption_table is not None:
            return
        try:
            self.text_index = FileIndex(self.path, (CAPTION_SUFFIX,))
        except ConfigError:
            raise ConfigError(
                f"dataset.captions=true but {where} has no captions: a sidecar {CAPTION_SUFFIX} "
                'per image or a "captions" table in dataset.json'
            ) from None
        self.text_of = sidecar_names(names, list(self.text_index.names), where)

    @property
    def captioned(self) -> bool:
        return self.caption_table is not None or self.text_index is not None

    def caption(self, i: int, choice: int = 0) -> str:
        """One of image ``i``'s captions, picked by ``choice`` (a sample's caption seed)."""
        if self.caption_table is not None:
            return self.caption_table.caption(i, choice)
        k = int(self.text_of[i])
        try:
            text = self.text_index.read(k).decode("utf-8")
        except (CorruptFile, UnicodeDecodeError) as e:
            raise ConfigError(f"caption {self.text_index.where(k)} does not read ({e})") from None
        caps = [c.strip() for c in text.splitlines() if c.strip()]
        if not caps:
            raise ConfigError(f"caption {self.text_index.where(k)} is empty")
        return caps[choice % len(caps)]

    def _first_readable(self) -> bytes:
        """The first image's bytes (the first readable one with ``skip_corrupt``)."""
        for i in range(len(self.index)):
            try:
                data = self.index.read(i)
                try:
                    image_mode(data)
                except CorruptFile as e:
                    raise CorruptFile(f"{self.index.where(i)} {e}") from None
                return data
            except CorruptFile as e:
                if not self.skip_corrupt:
                    raise ConfigError(f"{e}; remove it or set dataset.skip_corrupt=true") from None
        raise ConfigError(f"dataset.path={str(self.path)!r}: no image could be read")

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> tuple[Tensor, int]:
        data = self.index.read(i)
        try:
            arr = decode_image(data, self.mode)
        except CorruptFile as e:
            raise CorruptFile(f"{self.index.where(i)} {e}") from None
        if arr.shape != (self.shape[1], self.shape[2], self.shape[0]):
            h, w, c = arr.shape
            raise ConfigError(
                f"{self.index.where(i)} is {h}x{w}x{c} but the dataset's images are "
                f"{self.shape[1]}x{self.shape[2]}x{self.shape[0]} (from {self.index.names[0]!r}); "
                "dl-dataset convert resolution=... makes them one size"
            )
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), self.label(i)

    def finish_batch(self, x: Tensor) -> Tensor:
        return uint8_to_float(x)
