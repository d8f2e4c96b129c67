"""Test data in NVlabs' dataset format, written here independently of ``dl-dataset convert``
(as ``dataset_tool.py`` writes it: ``00000/img00000000.png`` uncompressed PNGs and
``dataset.json`` ``{"labels": [[name, label], ...] | null}``), and a small fake CIFAR-10
python tarball."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, channels]."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    bits = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        bits, format="png", compress_level=0
    )
    return bits.getvalue()


def name(i: int) -> str:
    s = f"{i:08d}"
    return f"{s[:5]}/img{s}.png"


def write_dataset(
    dest: Path, images: np.ndarray, labels: list[int] | None = None, meta: bool = True
) -> Path:
    """``dest`` ending in .zip: a zip; otherwise a folder. ``meta=False`` leaves out dataset.json."""
    files = {name(i): png(img) for i, img in enumerate(images)}
    table = None if labels is None else [[name(i), int(y)] for i, y in enumerate(labels)]
    if meta:
        files["dataset.json"] = json.dumps({"labels": table}).encode()
    if str(dest).endswith(".zip"):
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
            for k, v in files.items():
                z.writestr(k, v)
    else:
        for k, v in files.items():
            (dest / k).parent.mkdir(parents=True, exist_ok=True)
            (dest / k).write_bytes(v)
    return dest


def write_cifar_tarball(path: Path, per_batch: int = 4, seed: int = 0) -> tuple[np.ndarray, list]:
    """A ``cifar-10-python.tar.gz`` with ``per_batch`` images in each of the 5 training batches;
    returns the images (NHWC uint8) and labels in order."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, per_batch).tolist()
            blob = pickle.dumps({"data": data, "labels": y, "batch_label": f"b{b}"}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += y
    return np.concatenate(images), labels
