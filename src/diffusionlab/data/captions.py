"""Captions beside images, for text-conditioned training (``cond=text``; docs/conditioning.md).

An image may have several captions (one per line of its caption text); a training sample reads
one of them, chosen from its own seed (``CAPTION_STREAM``), so which caption a step sees does
not depend on the batch split or the worker. Captions come from

- a sidecar ``.txt`` per image (``img001.png`` -> ``img001.txt``) in image folders and in
  dataset zips / folders in NVlabs' layout;
- a ``captions`` table in the zip's ``dataset.json``: ``{"captions": [[name, caption or
  [captions]], ...]}`` beside NVlabs' ``labels``;
- the embedded captioned MNIST (``dataset=text_mnist``), written from the labels with varied
  wording (:data:`TEMPLATES`).

Captions are held packed (one byte buffer and offsets, as the file index's names), not as a
Python string per image."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusionlab.data.archive import NameTable
from diffusionlab.errors import ConfigError

CAPTION_SUFFIX = ".txt"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# the wordings of the captioned MNIST: {w} the digit's name, {d} its numeral
TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "a {w}",
    "number {w}",
    "an image of the number {d}",
    "{w}",
    "a drawing of a {w}",
    "the number {w} written by hand",
    "digit {w}",
    "{d}",
)


def digit_caption(template: str, label: int) -> str:
    """``template`` filled in for digit ``label``."""
    return template.format(w=DIGIT_WORDS[label], d=label)


class CaptionTable:
    """The captions of ``n`` images, packed: ``captions(i)`` lists image ``i``'s captions,
    ``caption(i, choice)`` picks one by an integer (a sample's caption seed)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.table = NameTable([t.strip() for t in texts])

    def __len__(self) -> int:
        return len(self.table)

    def captions(self, i: int) -> list[str]:
        lines = [c.strip() for c in self.table[i].splitlines()]
        return [c for c in lines if c]

    def caption(self, i: int, choice: int = 0) -> str:
        caps = self.captions(i)
        return caps[choice % len(caps)] if caps else ""


def read_sidecars(images: Sequence[Path], key: str = "dataset.captions") -> CaptionTable:
    """The sidecar ``.txt`` of every image path; a missing or empty one stops with its name."""
    texts = []
    for p in images:
        txt = p.with_suffix(CAPTION_SUFFIX)
        try:
            text = txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{key}=true but {str(p)!r} has no caption file {str(txt)!r} "
                "(one .txt per image, one caption per line)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"caption file {str(txt)!r} does not read ({e})") from None
        if not text.strip():
            raise ConfigError(f"caption file {str(txt)!r} is empty")
        texts.append(text)
    return CaptionTable(texts)


def captions_from_metadata(
    metadata: bytes | None, names: Sequence[str], where: str
) -> CaptionTable | None:
    """The ``captions`` table of a ``dataset.json`` for the images ``names`` (None when it has
    none); an image without an entry stops with its name."""
    if metadata is None:
        return None
    try:
        table = json.loads(metadata).get("captions")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: dataset.json does not parse ({e})") from None
    if table is None:
        return None
    try:
        table = dict(table)
    except (TypeError, ValueError):
        raise ConfigError(
            f'{where}: dataset.json "captions" must be [[name, caption or [captions]], ...]'
        ) from None
    texts = []
    for n in names:
        if n not in table:
            raise ConfigError(f"{where}: dataset.json has no caption for {n!r}")
        value = table[n]
        texts.append("\n".join(value) if isinstance(value, list) else str(value))
    return CaptionTable(texts)


def sidecar_names(image_names: Sequence[str], text_names: Sequence[str], where: str) -> np.ndarray:
    """For each image member name, the index of its sidecar among ``text_names`` (same path,
    ``.txt``); a missing one stops with its name."""
    lookup = {n.rsplit(".", 1)[0]: k for k, n in enumerate(text_names)}
    out = np.empty(len(image_names), dtype=np.int64)
    for i, n in enumerate(image_names):
        k = lookup.get(n.rsplit(".", 1)[0])
        if k is None:
            raise ConfigError(
                f"{where}: image {n!r} has no caption ({n.rsplit('.', 1)[0]}{CAPTION_SUFFIX} or a "
                'dataset.json "captions" entry)'
            )
        out[i] = k
    return out


class CaptionedImages(torch.utils.data.Dataset):
    """Images in memory (a :class:`~diffusionlab.data.datasets.TensorImageDataset`) with their
    captions: items stay ``(image, label)``; ``caption(i, choice)`` gives a sample's caption."""

    captioned = True

    def __init__(self, base: torch.utils.data.Dataset, captions: CaptionTable) -> None:
        if len(captions) != len(base):
            raise ValueError(f"{len(captions)} captions for {len(base)} images")
        self.base = base
        self.table = captions
        self.images: Tensor = base.images
        self.labels: Tensor | None = base.labels
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    def caption(self, i: int, choice: int = 0) -> str:
        return self.table.caption(i, choice)

    def captions(self, i: int) -> list[str]:
        return self.table.captions(i)


def mnist_captions(labels: Tensor, templates: Sequence[str] = TEMPLATES) -> CaptionTable:
    """Every wording of ``templates`` for each digit label (one caption per line)."""
    lines = {k: "\n".join(digit_caption(t, k) for t in templates) for k in range(10)}
    return CaptionTable([lines[int(y)] for y in labels])


def text_mnist(
    resolution: int = 16,
    channels: int = 1,
    num_classes: int = 0,
    split: str = "all",
    templates: Sequence[str] = TEMPLATES,
) -> CaptionedImages:
    """The embedded MNIST digits with captions written from their labels in the wordings of
    ``templates`` (``dataset=text_mnist``); ``num_classes`` 10 also keeps the labels."""
    from diffusionlab.data.datasets import TensorImageDataset, mnist

    if not templates:
        raise ConfigError("dataset.templates is empty: give at least one wording")
    if num_classes not in (0, 10):
        raise ConfigError(f"dataset.num_classes={num_classes} must be 0 or 10")
    labelled = mnist(resolution, channels, 10, split)
    base = labelled if num_classes else TensorImageDataset(labelled.images, None, 0)
    return CaptionedImages(base, mnist_captions(labelled.labels, list(templates)))


CaptionFn = Callable[[int, int], str]
