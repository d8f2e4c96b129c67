"""Random access to the files of a dataset without holding them: a zip archive or a folder, in
the layout NVlabs' ``dataset_tool.py`` writes (``00000/img00000000.png`` ... and ``dataset.json``
with ``{"labels": [[name, label], ...] | null}``).

The index is a few numpy arrays (names packed into one byte buffer, and for a zip the offset,
size, method and CRC of each member), so it costs about 40 bytes per file, is shared copy-on-write
by forked DataLoader workers (numpy arrays are not touched by reference counting), and a member is
read with two ``os.pread`` calls from a file descriptor each process opens for itself.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from diffusionlab.errors import ConfigError

METADATA = "dataset.json"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class CorruptFile(Exception):
    """A dataset file that cannot be read or decoded; the message names it."""


class NameTable:
    """Strings packed into one uint8 buffer plus offsets: no Python object per name."""

    def __init__(self, names: Sequence[str]) -> None:
        encoded = [n.encode() for n in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class FileIndex:
    """The files of a zip or a folder whose suffix is in ``suffixes``, sorted by name (as
    NVlabs' ``ImageFolderDataset``); ``read(i)`` returns the bytes of file ``i``.

    ``key`` names the config key in messages (``dataset.path``, ``source``)."""

    def __init__(self, path: str | Path, suffixes: Iterable[str], key: str = "dataset.path"):
        self.path = Path(path).expanduser()
        self.key = key
        suffixes = {s.lower() for s in suffixes}
        self._fd: int | None = None
        self._pid = -1
        self.metadata_bytes: bytes | None = None
        if self.path.is_dir():
            self.kind = "dir"
            names = sorted(n for n in _walk(self.path) if _suffix(n) in suffixes)
            meta = self.path / METADATA
            if meta.is_file():
                self.metadata_bytes = meta.read_bytes()
        elif self.path.is_file() and self.path.suffix.lower() == ".zip":
            self.kind = "zip"
            names = self._index_zip(suffixes)
        elif self.path.exists():
            raise ConfigError(f"{key}={str(self.path)!r} is neither a folder nor a .zip archive")
        else:
            raise ConfigError(f"{key}={str(self.path)!r} does not exist")
        if not names:
            raise ConfigError(
                f"{key}={str(self.path)!r} holds no files of type {', '.join(sorted(suffixes))}"
            )
        self.names = NameTable(names)

    def _index_zip(self, suffixes: set[str]) -> list[str]:
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = [i for i in z.infolist() if _suffix(i.filename) in suffixes]
                if METADATA in z.NameToInfo:
                    self.metadata_bytes = z.read(METADATA)
        except (zipfile.BadZipFile, OSError) as e:
            raise ConfigError(
                f"{self.key}={str(self.path)!r} is not a readable zip ({e})"
            ) from None
        infos.sort(key=lambda i: i.filename)
        n = len(infos)
        self.offsets = np.fromiter((i.header_offset for i in infos), np.int64, n)
        self.sizes = np.fromiter((i.compress_size for i in infos), np.int64, n)
        self.methods = np.fromiter((i.compress_type for i in infos), np.uint8, n)
        self.crcs = np.fromiter((i.CRC for i in infos), np.uint32, n)
        bad = set(np.unique(self.methods).tolist()) - {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
        if bad:
            raise ConfigError(
                f"{self.key}={str(self.path)!r} uses zip compression method(s) {sorted(bad)}; "
                "only stored and deflated members are read (dl-dataset convert writes stored)"
            )
        return [i.filename for i in infos]

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None, _pid=-1)

    def where(self, i: int) -> str:
        """``'<name>' in <path>``, for messages."""
        return f"{self.names[i]!r} in {str(self.path)!r}"

    def _descriptor(self) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, i: int) -> bytes:
        """The bytes of file ``i``; a truncated or damaged member raises :class:`CorruptFile`."""
        if self.kind == "dir":
            try:
                return (self.path / self.names[i]).read_bytes()
            except OSError as e:
                raise CorruptFile(f"{self.where(i)} cannot be read ({e})") from None
        fd = self._descriptor()
        offset = int(self.offsets[i])
        head = os.pread(fd, _LOCAL_HEADER.size, offset)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
            raise CorruptFile(f"{self.where(i)}: damaged zip entry header")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        size = int(self.sizes[i])
        data = os.pread(fd, size, offset + _LOCAL_HEADER.size + name_len + extra_len)
        if len(data) != size:
            raise CorruptFile(f"{self.where(i)} is truncated")
        if self.methods[i] == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as e:
                raise CorruptFile(f"{self.where(i)} does not inflate ({e})") from None
        if zlib.crc32(data) != int(self.crcs[i]):
            raise CorruptFile(f"{self.where(i)} fails its CRC check")
        return data

    def labels(self, num_classes: int | None, folders_as_classes: bool = True) -> np.ndarray | None:
        """Integer labels of the files (int64 [N]) from ``dataset.json``; without that file
        (``folders_as_classes``) the top-level folder names, sorted, when there are several, as
        ``dataset_tool.py convert`` labels a folder; None when unlabelled."""
        table = None
        if self.metadata_bytes is not None:
            try:
                table = json.loads(self.metadata_bytes)["labels"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{self.key}={str(self.path)!r}: {METADATA} is not NVlabs' format "
                    f'{{"labels": [[name, label], ...]}} ({type(e).__name__}: {e})'
                ) from None
            if table is None:
                return None
            table = dict(table)
            missing = next((n for n in self.names if n not in table), None)
            if missing is not None:
                raise ConfigError(
                    f"{self.key}={str(self.path)!r}: {METADATA} has no label for {missing!r}"
                )
            values = [table[n] for n in self.names]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                bad = next(
                    n for n, v in zip(self.names, values, strict=True) if not isinstance(v, int)
                )
                raise ConfigError(
                    f"{self.key}={str(self.path)!r}: the {METADATA} label of {bad!r} is "
                    f"{table[bad]!r}; only integer class labels are supported"
                )
            labels = np.asarray(values, dtype=np.int64)
        elif folders_as_classes:
            top = [n.split("/")[0] if "/" in n else "" for n in self.names]
            classes = sorted(set(top))
            if len(classes) < 2:
                return None
            lookup = {c: k for k, c in enumerate(classes)}
            labels = np.asarray([lookup[t] for t in top], dtype=np.int64)
        else:
            return None
        if labels.min() < 0:
            raise ConfigError(f"{self.key}={str(self.path)!r}: labels must be >= 0")
        if num_classes and labels.max() >= num_classes:
            raise ConfigError(
                f"dataset.num_classes={num_classes} but {str(self.path)!r} has label "
                f"{int(labels.max())}"
            )
        return labels


def _walk(root: Path) -> list[str]:
    """Relative '/'-separated paths of every file under ``root`` (os.scandir, as dataset_tool)."""
    out: list[str] = []
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir():
                    stack.append((e.path, f"{prefix}{e.name}/"))
                elif e.is_file():
                    out.append(prefix + e.name)
    return out
