"""``dl-dataset convert``: an image folder, a zip or the CIFAR-10 python tarball -> a dataset in
NVlabs' format (a zip or folder of ``00000/img00000000.png`` ... uncompressed PNGs and
``dataset.json``), or LitData chunks for streaming (``format=litdata``).

Reading, transforming and PNG-encoding run in worker processes (in order, so the output does not
depend on their number); the main process writes. Images are read and converted to RGB (or
greyscale with ``channels=1``) before the transform, as ``dataset_tool.py`` does, so the PNGs are
pixel-identical to EDM2's for the same transform.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffusionlab.data.archive import METADATA, CorruptFile, FileIndex
from diffusionlab.data.image_archive import IMAGE_EXTENSIONS, decode_image
from diffusionlab.data.transforms import Transform, make_transform, parse_resolution
from diffusionlab.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("zip", "folder", "litdata")
# index.json of a LitData output gets this key: what the reader needs before the first sample
LITDATA_KEY = "diffusionlab"


def archive_name(idx: int, suffix: str = "png", stem: str = "img") -> str:
    """dataset_tool's member name of image ``idx``: ``00012/img00012345.png``."""
    s = f"{idx:08d}"
    return f"{s[:5]}/{stem}{s}.{suffix}"


# ----------------------------------------------------------------------------- sources
class FileSource:
    """The images of a folder or zip (recursive, sorted), labels as dataset_tool reads them:
    ``dataset.json``, else (folders only) the top-level folder names."""

    def __init__(self, path: str, key: str = "source") -> None:
        self.index = FileIndex(path, IMAGE_EXTENSIONS, key=key)
        self.path = path

    def __len__(self) -> int:
        return len(self.index)

    def labels(self) -> np.ndarray | None:
        return self.index.labels(None, folders_as_classes=self.index.kind == "dir")

    def name(self, i: int) -> str:
        return self.index.where(i)

    def image(self, i: int, mode: str) -> np.ndarray:
        data = self.index.read(i)
        try:
            return decode_image(data, mode)
        except CorruptFile as e:
            raise CorruptFile(f"{self.index.where(i)} {e}") from None


class Cifar10Source:
    """The 50,000 training images of ``cifar-10-python.tar.gz`` (as EDM's dataset_tool)."""

    def __init__(self, path: str, key: str = "source") -> None:
        try:
            images, labels = [], []
            with tarfile.open(path, "r:gz") as tar:
                for batch in range(1, 6):
                    member = tar.getmember(f"cifar-10-batches-py/data_batch_{batch}")
                    with tar.extractfile(member) as f:
                        # the CIFAR-10 batches are Python pickles of numpy arrays, and nothing else
                        data = _CifarUnpickler(f, encoding="latin1").load()
                    images.append(np.asarray(data["data"], np.uint8).reshape(-1, 3, 32, 32))
                    labels.append(np.asarray(data["labels"], np.int64))
        except (OSError, KeyError, tarfile.TarError, pickle.UnpicklingError, EOFError) as e:
            raise ConfigError(
                f"{key}={path!r} is not the CIFAR-10 python tarball (cifar-10-python.tar.gz): {e}"
            ) from None
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)
        self._labels = np.concatenate(labels)
        self.path = path

    def __len__(self) -> int:
        return len(self.images)

    def labels(self) -> np.ndarray:
        return self._labels

    def name(self, i: int) -> str:
        return f"image {i} of {self.path!r}"

    def image(self, i: int, mode: str) -> np.ndarray:
        img = self.images[i]
        return img if mode == "RGB" else np.asarray(Image.fromarray(img).convert("L"))[..., None]


class _CifarUnpickler(pickle.Unpickler):
    """Only the numpy types the CIFAR-10 batches hold; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def open_source(path: str, key: str = "source") -> FileSource | Cifar10Source:
    """A folder, a ``.zip`` or the CIFAR-10 ``.tar.gz``."""
    p = Path(path).expanduser()
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        return Cifar10Source(str(p), key)
    return FileSource(str(p), key)


# ----------------------------------------------------------------------------- writers
class ZipWriter:
    """An uncompressed zip, written as ``<dest>.tmp`` and renamed when complete."""

    def __init__(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.dest, self.tmp = dest, dest.with_name(dest.name + ".tmp")
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED)

    def add(self, name: str, data: bytes) -> None:
        self.zf.writestr(name, data)

    def close(self, metadata: bytes) -> None:
        self.zf.writestr(METADATA, metadata)
        self.zf.close()
        self.tmp.replace(self.dest)

    def abort(self) -> None:
        self.zf.close()
        self.tmp.unlink(missing_ok=True)


class FolderWriter:
    """A folder in the same layout (dataset_tool's folder output); it must be empty or absent."""

    def __init__(self, dest: Path) -> None:
        if dest.is_dir() and any(dest.iterdir()):
            raise ConfigError(f"dest={str(dest)!r} is a folder that is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest

    def add(self, name: str, data: bytes) -> None:
        path = self.dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self, metadata: bytes) -> None:
        (self.dest / METADATA).write_bytes(metadata)

    def abort(self) -> None:
        pass


class LitDataWriter:
    """LitData chunks (``BinaryWriter``) of ``{"image": PNG bytes, "label": int}``, in order;
    ``index.json`` also records the shape and class count under ``"diffusionlab"``."""

    def __init__(self, dest: Path, chunk_bytes: str) -> None:
        from litdata.streaming.writer import BinaryWriter

        if dest.is_dir() and any(dest.iterdir()):
            raise ConfigError(f"dest={str(dest)!r} is a folder that is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.writer = BinaryWriter(str(dest), chunk_bytes=chunk_bytes)
        self.count = 0
        self.labels: list[int] = []

    def add(self, name: str, data: bytes, label: int | None = None) -> None:
        self.writer.add_item(self.count, {"image": data, "label": -1 if label is None else label})
        self.count += 1

    def close(self, metadata: bytes, info: dict | None = None) -> None:
        self.writer.done()
        self.writer.merge()
        index_path = self.dest / "index.json"
        index = json.loads(index_path.read_text())
        index[LITDATA_KEY] = info or {}
        index_path.write_text(json.dumps(index, sort_keys=True))

    def abort(self) -> None:
        shutil.rmtree(self.dest, ignore_errors=True)


# ----------------------------------------------------------------------------- the conversion
@dataclass
class Converted:
    """What one source image became: PNG bytes (None when skipped) or the error."""

    index: int
    png: bytes | None
    shape: tuple[int, ...] | None = None
    error: str | None = None


_JOB: dict = {}  # the source and transform, inherited by forked workers


def _convert_one(i: int) -> Converted:
    source, transform, mode = _JOB["source"], _JOB["transform"], _JOB["mode"]
    try:
        img = source.image(i, mode)
    except CorruptFile as e:
        return Converted(i, None, error=str(e))
    out = transform(img[..., 0] if mode == "L" else img)
    if out is None:  # center-crop-wide: too small
        return Converted(i, None)
    bits = io.BytesIO()
    Image.fromarray(out).save(bits, format="png", compress_level=0, optimize=False)
    return Converted(i, bits.getvalue(), out.shape[:2])


def _results(order: list[int], num_workers: int) -> Iterator[Converted]:
    if num_workers <= 1 or len(order) < 64:
        yield from map(_convert_one, order)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(num_workers) as pool:
        yield from pool.imap(_convert_one, order, chunksize=32)


def convert(
    source: str,
    dest: str,
    resolution: int | str | None = None,
    transform: str | None = None,
    channels: int = 3,
    max_images: int | None = None,
    skip_corrupt: bool = False,
    format: str | None = None,
    num_workers: int = 0,
    chunk_bytes: str = "64MB",
    shuffle: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Convert ``source`` into ``dest``; returns a summary (images written, skipped, shape,
    classes). A source image that does not decode stops the conversion with its name, or with
    ``skip_corrupt`` is left out with a warning. ``shuffle`` (LitData only; the default there)
    writes the images in a seeded random order, so that every chunk is a random sample of the
    dataset (streaming mixes a few chunks at a time)."""
    from tqdm import tqdm

    if channels not in (1, 3):
        raise ConfigError(f"channels={channels} must be 1 (greyscale) or 3 (RGB)")
    fmt = format or ("zip" if str(dest).lower().endswith(".zip") else "folder")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {FORMATS}")
    if fmt == "zip" and not str(dest).lower().endswith(".zip"):
        raise ConfigError(f"dest={dest!r}: format=zip writes a .zip file")
    size = parse_resolution(resolution)
    transform_fn: Transform = make_transform(transform, size)
    src = open_source(source)
    labels = src.labels()
    n = len(src) if max_images is None else min(len(src), int(max_images))
    shuffle = fmt == "litdata" if shuffle is None else bool(shuffle)
    if shuffle and fmt != "litdata":
        raise ConfigError(f"shuffle=true is for format=litdata; a {fmt} keeps the source order")
    order = list(range(n))
    if shuffle:
        order = np.random.default_rng(seed).permutation(n).tolist()
    dest_path = Path(dest).expanduser()
    writer = (
        ZipWriter(dest_path)
        if fmt == "zip"
        else FolderWriter(dest_path)
        if fmt == "folder"
        else LitDataWriter(dest_path, chunk_bytes)
    )
    _JOB.update(source=src, transform=transform_fn, mode="L" if channels == 1 else "RGB")
    written: list[list] = []
    skipped: list[str] = []
    first: tuple[int, ...] | None = None
    try:
        results = _results(order, num_workers or 0)
        for r in tqdm(results, total=n, desc=f"convert -> {dest}", disable=not progress):
            if r.error is not None:
                if not skip_corrupt:
                    raise ConfigError(f"{r.error}; remove it or set skip_corrupt=true")
                log.warning("skipping %s", r.error)
                skipped.append(r.error)
                continue
            if r.png is None:
                continue
            name = archive_name(r.index)
            if first is None:
                first = r.shape
                if first[0] != first[1]:
                    raise ConfigError(
                        f"{src.name(r.index)} is {first[1]}x{first[0]} after "
                        f"transform={transform or 'none'}; images must be square (set "
                        "resolution=N transform=center-crop)"
                    )
            elif r.shape != first:
                raise ConfigError(
                    f"{src.name(r.index)} is {r.shape[1]}x{r.shape[0]} after "
                    f"transform={transform or 'none'}, the first image {first[1]}x{first[0]}; "
                    "set resolution=N (and transform=center-crop) to make them one size"
                )
            label = None if labels is None else int(labels[r.index])
            if fmt == "litdata":
                writer.add(name, r.png, label)
            else:
                writer.add(name, r.png)
            written.append([name, label])
        if not written:
            raise ConfigError(f"source={source!r}: no image was converted")
        table = written if labels is not None else None
        metadata = json.dumps({"labels": table}).encode()
        info = {
            "count": len(written),
            "resolution": int(first[0]),
            "channels": channels,
            "num_classes": 0 if labels is None else int(labels.max()) + 1,
            "shuffle_seed": seed if shuffle else None,
        }
        if fmt == "litdata":
            writer.close(metadata, info)
        else:
            writer.close(metadata)
    except BaseException:
        writer.abort()
        raise
    finally:
        _JOB.clear()
    return {"dest": str(dest_path), "format": fmt, "skipped": skipped, **info}


def default_workers() -> int:
    """Worker processes for ``num_workers=auto``: the CPUs this process may use, at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cpus or 1))
