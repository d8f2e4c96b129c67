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
            entries = central_directory(self.path)
        except (zipfile.BadZipFile, OSError, struct.error, ValueError):
            try:  # anything our reader does not expect: the standard library's (slower) reader
                with zipfile.ZipFile(self.path) as z:
                    entries = [
                        (i.filename, i.header_offset, i.compress_size, i.compress_type, i.CRC)
                        for i in z.infolist()
                    ]
            except (zipfile.BadZipFile, OSError) as e:
                raise ConfigError(
                    f"{self.key}={str(self.path)!r} is not a readable zip ({e})"
                ) from None
        meta = next((e for e in entries if e[0] == METADATA), None)
        entries = sorted(e for e in entries if _suffix(e[0]) in suffixes)
        n = len(entries)
        self.offsets = np.fromiter((e[1] for e in entries), np.int64, n)
        self.sizes = np.fromiter((e[2] for e in entries), np.int64, n)
        self.methods = np.fromiter((e[3] for e in entries), np.uint8, n)
        self.crcs = np.fromiter((e[4] for e in entries), np.uint32, n)
        bad = set(np.unique(self.methods).tolist()) - {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
        if bad:
            raise ConfigError(
                f"{self.key}={str(self.path)!r} uses zip compression method(s) {sorted(bad)}; "
                "only stored and deflated members are read (dl-dataset convert writes stored)"
            )
        if meta is not None:
            try:
                self.metadata_bytes = self._member(*meta[1:], where=f"{METADATA!r}")
            except CorruptFile as e:
                raise ConfigError(f"{self.key}={str(self.path)!r}: {e}") from None
        return [e[0] for e in entries]

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
        return self._member(
            int(self.offsets[i]),
            int(self.sizes[i]),
            int(self.methods[i]),
            int(self.crcs[i]),
            where=self.where(i),
        )

    def _member(self, offset: int, size: int, method: int, crc: int, where: str) -> bytes:
        """A zip member's bytes from its local header at ``offset``, inflated and CRC-checked."""
        fd = self._descriptor()
        head = os.pread(fd, _LOCAL_HEADER.size, offset)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
            raise CorruptFile(f"{where}: damaged zip entry header")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        data = os.pread(fd, size, offset + _LOCAL_HEADER.size + name_len + extra_len)
        if len(data) != size:
            raise CorruptFile(f"{where} is truncated")
        if method == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as e:
                raise CorruptFile(f"{where} does not inflate ({e})") from None
        if zlib.crc32(data) != crc:
            raise CorruptFile(f"{where} fails its CRC check")
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


_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header
_MAX32 = 0xFFFFFFFF


def central_directory(path: Path) -> list[tuple[str, int, int, int, int]]:
    """``(name, local header offset, compressed size, method, CRC-32)`` of every member, read
    from the zip's central directory in one pass (zip64 included): several times faster than
    ``zipfile.ZipFile``, which builds a ``ZipInfo`` object per member. Raises ``BadZipFile`` /
    ``struct.error`` / ``ValueError`` on anything unexpected (the caller falls back to
    ``zipfile``)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        tail_len = min(size, 65536 + _EOCD.size + _ZIP64_LOCATOR.size)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0:
            raise zipfile.BadZipFile("no end of central directory record")
        _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        eocd_pos = size - tail_len + at
        if _MAX32 in (cd_size, cd_offset) or count == 0xFFFF:
            loc = at - _ZIP64_LOCATOR.size
            sig, _, z64_pos, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
            if sig != b"PK\x06\x07":
                raise zipfile.BadZipFile("no zip64 locator")
            f.seek(z64_pos)
            rec = f.read(_ZIP64_EOCD.size)
            sig, _, _, _, _, _, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack_from(rec)
            if sig != b"PK\x06\x06":
                raise zipfile.BadZipFile("no zip64 end of central directory")
            eocd_pos = z64_pos
        concat = eocd_pos - cd_size - cd_offset  # bytes prepended to the archive, if any
        f.seek(cd_offset + concat)
        cd = f.read(cd_size)
    out = []
    pos = 0
    unpack = _CENTRAL.unpack_from
    for _ in range(count):
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, offset) = (
            unpack(cd, pos)
        )
        if sig != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        start = pos + _CENTRAL.size
        raw = cd[start : start + nlen]
        name = raw.decode("utf-8") if flags & 0x800 else raw.decode("cp437")
        if _MAX32 in (csize, usize, offset):
            csize, offset = _zip64_extra(
                cd[start + nlen : start + nlen + elen], usize, csize, offset
            )
        out.append((name, offset + concat, csize, method, crc))
        pos = start + nlen + elen + clen
    if pos != len(cd):
        raise zipfile.BadZipFile("central directory size mismatch")
    return out


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int]:
    """The 64-bit compressed size and header offset from a zip64 extra field (id 1), whose
    values appear in this order for the 32-bit fields that are 0xFFFFFFFF."""
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, i + 4))
            if usize == _MAX32:
                values.pop(0)
            if csize == _MAX32:
                csize = values.pop(0)
            if offset == _MAX32:
                offset = values.pop(0)
            return csize, offset
        i += 4 + length
    raise zipfile.BadZipFile("zip64 sizes without a zip64 extra field")
