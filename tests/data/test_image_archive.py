"""dataset=zip: NVlabs dataset zips and folders read lazily with exact pixels and labels; one clear
message for a corrupt member, a missing label or a resolution mismatch; the lazy loader keeps
exact resume and the DDP sharding (no sample twice in an epoch across ranks)."""

import json
import zipfile

import numpy as np
import pytest
import torch
from nvlabs_format import name, random_images, write_dataset

from diffusionlab.cli.common import user_message
from diffusionlab.data import DiffusionDataModule
from diffusionlab.data.archive import FileIndex
from diffusionlab.data.image_archive import ImageArchive
from diffusionlab.data.lazy import LazyImages
from diffusionlab.errors import ConfigError

IMAGES = random_images(12, size=8)
LABELS = [i % 4 for i in range(12)]


@pytest.fixture(params=["zip", "folder"])
def dataset_path(request, tmp_path):
    dest = tmp_path / ("d.zip" if request.param == "zip" else "d")
    return write_dataset(dest, IMAGES, LABELS)


def test_pixels_labels_and_shape_from_the_files(dataset_path):
    ds = ImageArchive(str(dataset_path))
    assert len(ds) == 12 and ds.shape == (3, 8, 8) and ds.num_classes == 4
    for i in (0, 5, 11):
        x, y = ds[i]
        expected = torch.from_numpy(IMAGES[i]).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.equal(x, expected) and y == LABELS[i]  # bitwise: same formula as NVlabs
    assert ds.labels.tolist() == LABELS
    assert isinstance(ds.images, LazyImages) and ds.images.shape == (12, 3, 8, 8)
    assert torch.equal(ds.images[[2, 3]], torch.stack([ds[2][0], ds[3][0]]))
    # the stored form travels as uint8 and is finished on the device
    raw, label = ds.raw_item(5)
    assert raw.dtype == torch.uint8 and torch.equal(ds.finish_batch(raw[None])[0], ds[5][0])


def test_index_holds_arrays_not_python_objects(tmp_path):
    index = FileIndex(write_dataset(tmp_path / "d.zip", IMAGES, LABELS), [".png"])
    assert index.names.blob.dtype == np.uint8 and index.offsets.dtype == np.int64
    assert [index.names[i] for i in (0, 11)] == [name(0), name(11)]
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        assert index.read(7) == z.read(name(7))


def test_unlabelled_greyscale_and_num_classes_zero(tmp_path):
    grey = random_images(4, size=8, channels=1)
    ds = ImageArchive(str(write_dataset(tmp_path / "g.zip", grey, None)))
    assert ds.shape == (1, 8, 8) and ds.num_classes == 0 and ds[0][1] == -1
    assert torch.equal(ds[1][0], torch.from_numpy(grey[1]).permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ConfigError, match="dataset.num_classes=3 but .* has no labels"):
        ImageArchive(str(tmp_path / "g.zip"), num_classes=3)
    labelled = ImageArchive(str(write_dataset(tmp_path / "l.zip", IMAGES, LABELS)), num_classes=0)
    assert labelled.num_classes == 0 and labelled[3][1] == -1


def test_folders_without_dataset_json_label_by_top_level_folder(tmp_path):
    for k, c in enumerate(("cat", "dog")):
        write_dataset(tmp_path / "f" / c, IMAGES[k * 3 : k * 3 + 3], None, meta=False)
    ds = ImageArchive(str(tmp_path / "f"))
    assert ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_resolution_or_channels_that_do_not_match_the_files(tmp_path):
    path = str(write_dataset(tmp_path / "d.zip", IMAGES, LABELS))
    with pytest.raises(ConfigError) as e:
        ImageArchive(path, resolution=32)
    assert "dataset.resolution=32" in str(e.value) and "8x8" in str(e.value)
    with pytest.raises(ConfigError, match="dataset.channels=1 .* are RGB"):
        ImageArchive(path, channels=1)
    assert ImageArchive(path, resolution=8, channels=3).shape == (3, 8, 8)


def test_images_of_another_size_name_the_member(tmp_path):
    images = [*IMAGES[:3], random_images(1, size=4)[0]]
    files = {name(i): img for i, img in enumerate(images)}
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        from nvlabs_format import png

        for k, img in files.items():
            z.writestr(k, png(img))
    ds = ImageArchive(str(tmp_path / "d.zip"))
    with pytest.raises(ConfigError, match=r"img00000003.png' in .* is 4x4x3 but .* 8x8x3"):
        ds[3]


def _corrupt(path, member: str, data: bytes) -> None:
    """Rewrite ``member`` of the zip at ``path`` with ``data``."""
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files[member] = data
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


def test_corrupt_member_one_message_or_skipped(tmp_path, caplog):
    path = write_dataset(tmp_path / "d.zip", IMAGES, LABELS)
    _corrupt(path, name(4), b"\x89PNG not really")
    ds = ImageArchive(str(path))
    with pytest.raises(ConfigError) as e:
        ds[4]
    text = user_message(e.value)
    assert "img00000004.png' in" in text and "is not a readable image" in text
    assert "dataset.skip_corrupt=true" in text and "\n" not in text
    skipping = ImageArchive(str(path), skip_corrupt=True)
    x, y = skipping[4]  # the next readable sample stands in, the same on every rank
    assert torch.equal(x, ds[5][0]) and y == LABELS[5]
    assert "img00000004.png" in caplog.text


def test_damaged_bytes_fail_the_crc_check(tmp_path):
    path = write_dataset(tmp_path / "d.zip", IMAGES, LABELS)
    index = FileIndex(path, [".png"])
    raw = bytearray(path.read_bytes())
    start = int(index.offsets[2]) + 30 + len(name(2)) + 60  # inside member 2's pixel data
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"img00000002.png' in .* fails its CRC check"):
        ImageArchive(str(path))[2]


def test_worker_errors_reach_the_user_as_one_line(tmp_path):
    path = write_dataset(tmp_path / "d.zip", IMAGES, LABELS)
    _corrupt(path, name(1), b"junk")
    dm = DiffusionDataModule(lambda: ImageArchive(str(path)), batch_size=12, num_workers=1)
    with pytest.raises(ConfigError) as e:
        next(iter(dm.train_dataloader()))
    text = user_message(e.value)
    assert text.startswith("'00000/img00000001.png' in") and "\n" not in text


def test_missing_label_or_a_foreign_dataset_json(tmp_path):
    path = write_dataset(tmp_path / "d.zip", IMAGES, LABELS)
    table = [[name(i), LABELS[i]] for i in range(12) if i != 6]
    _corrupt(path, "dataset.json", json.dumps({"labels": table}).encode())
    with pytest.raises(ConfigError, match=r"dataset.json has no label for '00000/img00000006.png'"):
        ImageArchive(str(path))
    _corrupt(path, "dataset.json", b'{"classes": 3}')
    with pytest.raises(ConfigError, match="dataset.json is not NVlabs' format"):
        ImageArchive(str(path))


def test_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.* does not exist"):
        ImageArchive(str(tmp_path / "nope.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="dataset.path=.* holds no files"):
        ImageArchive(str(tmp_path / "empty"))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a readable zip"):
        ImageArchive(str(tmp_path / "bad.zip"))


# ----------------------------------------------------------------------- the lazy data stream
def _batches(dm: DiffusionDataModule, world: int, rank: int, steps: int, start_step: int = 0):
    """``steps`` batches of ``rank`` in a ``world``-rank run, read through the DataLoader."""
    from torch.utils.data import DataLoader

    from diffusionlab.data.datamodule import Collate, _Stored
    from diffusionlab.data.sampler import PositionedDataset

    loader = DataLoader(
        PositionedDataset(_Stored(dm.dataset), dm.seed, dm.hflip),
        batch_sampler=dm.sampler(world, rank, start_step),
        collate_fn=Collate(),
        num_workers=1,
    )
    it = iter(loader)
    return [dm.finish(next(it)) for _ in range(steps)]


def test_ddp_shards_never_repeat_a_sample_within_an_epoch(tmp_path):
    path = write_dataset(tmp_path / "d.zip", random_images(24, size=4), list(range(24)))
    dm = DiffusionDataModule(lambda: ImageArchive(str(path)), batch_size=8, seed=5)
    seen = []
    for rank in (0, 1):
        for x, y, seeds in _batches(dm, world=2, rank=rank, steps=3):  # 3 steps = 1 epoch
            assert x.dtype == torch.float32 and x.shape == (4, 3, 4, 4)
            seen += y.tolist()
    assert sorted(seen) == list(range(24))  # labels are the indices: each exactly once
    # the two ranks of a step are the single-process step, split
    whole = _batches(dm, world=1, rank=0, steps=3)
    halves = [_batches(dm, 2, r, 3) for r in (0, 1)]
    for step in range(3):
        joined = torch.cat([halves[0][step][0], halves[1][step][0]])
        assert torch.equal(joined, whole[step][0])
        assert torch.equal(torch.cat([h[step][2] for h in halves]), whole[step][2])


def test_resume_replays_the_uninterrupted_stream(tmp_path):
    path = write_dataset(tmp_path / "d.zip", random_images(10, size=4), list(range(10)))
    make = lambda: DiffusionDataModule(  # noqa: E731
        lambda: ImageArchive(str(path)), batch_size=4, seed=1, hflip=True
    )
    full = _batches(make(), 1, 0, steps=6)  # crosses two epoch boundaries
    resumed = make()
    resumed.load_state_dict({"position": 3 * 4, "step": 3})
    rest = _batches(resumed, 1, 0, steps=3, start_step=3)
    for a, b in zip(full[3:], rest, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_loader_settings_follow_the_accelerator(tmp_path):
    from diffusionlab.data.datamodule import LoaderSettings

    cpu = LoaderSettings.resolve("auto", "auto", True, "auto", on_gpu=False, lazy=True)
    assert cpu == LoaderSettings(0, False, False, None)  # the CPU run stays in-process
    gpu = LoaderSettings.resolve("auto", "auto", True, "auto", on_gpu=True, lazy=True)
    assert gpu.num_workers >= 1 and gpu.pin_memory and gpu.persistent_workers
    assert gpu.prefetch_factor == 2
    in_memory = LoaderSettings.resolve("auto", "auto", True, "auto", on_gpu=True, lazy=False)
    assert in_memory.num_workers == 0 and in_memory.pin_memory
    assert LoaderSettings.resolve(3, False, True, 4, on_gpu=True, lazy=True).num_workers == 3
    with pytest.raises(ConfigError, match="data.num_workers='many'"):
        DiffusionDataModule(lambda: None, num_workers="many")
    with pytest.raises(ConfigError, match="data.pin_memory"):
        DiffusionDataModule(lambda: None, pin_memory="yes")


def test_nvlabs_edm_reads_the_same_pixels_and_labels(tmp_path):
    """Needs DL_EDM_PATH pointing at a checkout of github.com/NVlabs/edm."""
    import os
    import sys

    edm = os.environ.get("DL_EDM_PATH")
    if not edm:
        pytest.skip("DL_EDM_PATH not set")
    sys.path.insert(0, edm)
    try:
        from training.dataset import ImageFolderDataset
    finally:
        sys.path.remove(edm)
    path = write_dataset(tmp_path / "d.zip", IMAGES, LABELS)
    theirs, ours = ImageFolderDataset(str(path), use_labels=True), ImageArchive(str(path))
    assert len(theirs) == len(ours) and theirs.label_dim == ours.num_classes
    for i in range(len(ours)):
        image, onehot = theirs[i]
        x, y = ours[i]
        # EDM's training loop: images.to(float32) / 127.5 - 1
        assert torch.equal(torch.from_numpy(image).float() / 127.5 - 1, x)
        assert int(onehot.argmax()) == y


def test_central_directory_reader_agrees_with_zipfile(tmp_path):
    """zip64 members, a deflated member and bytes before the archive, as zipfile reads them."""
    from diffusionlab.data.archive import central_directory

    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/plain.png", b"x" * 100)
        z.writestr("b/deflated.png", b"y" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        with z.open("c/zip64.png", "w", force_zip64=True) as f:
            f.write(b"z" * 50)
        z.writestr("d/\u00e9t\u00e9.png", b"w")  # a UTF-8 name
    prefixed = tmp_path / "p.zip"
    prefixed.write_bytes(b"#!prefix\n" * 7 + path.read_bytes())
    for p in (path, prefixed):
        with zipfile.ZipFile(p) as z:
            want = [(i.filename, i.header_offset, i.compress_size, i.compress_type, i.CRC)
                    for i in z.infolist()]  # fmt: skip
        assert central_directory(p) == want
        index = FileIndex(p, [".png"])
        assert [index.read(i) for i in range(4)] == [b"x" * 100, b"y" * 1000, b"z" * 50, b"w"]
