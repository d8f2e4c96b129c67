"""dl-dataset convert: PNGs round-trip pixel-exact, labels from folders / dataset.json / the
CIFAR-10 tarball, EDM2's transforms, corrupt files stopped or skipped by name, LitData output;
with DL_EDM2_PATH, byte-identical to NVlabs' dataset_tool.py."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nvlabs_format import random_images, write_cifar_tarball, write_dataset
from PIL import Image

from diffusionlab.data.convert import convert
from diffusionlab.data.image_archive import ImageArchive
from diffusionlab.data.transforms import center_crop_dhariwal, make_transform
from diffusionlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _folder(root: Path, sizes=((40, 30), (30, 40), (33, 33)), per_class=2, seed=0) -> Path:
    """Mixed-size RGB images (PNG and JPEG) in class folders ``a``/``b``."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(root / c / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return root


def test_png_round_trip_is_pixel_exact_with_labels(tmp_path):
    images = random_images(6, size=16)
    write_dataset(tmp_path / "src", images, [5, 4, 3, 2, 1, 0])
    summary = convert(str(tmp_path / "src"), str(tmp_path / "out.zip"), progress=False)
    assert summary["count"] == 6 and summary["num_classes"] == 6 and summary["resolution"] == 16
    ds = ImageArchive(str(tmp_path / "out.zip"))
    for i in range(6):
        raw, label = ds.raw_item(i)
        assert torch.equal(raw, torch.from_numpy(images[i]).permute(2, 0, 1)) and label == 5 - i
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        names = z.namelist()
        assert names[0] == "00000/img00000000.png" and names[-1] == "dataset.json"
        meta = json.loads(z.read("dataset.json"))
        assert meta["labels"][2] == ["00000/img00000002.png", 3]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_folder_labels_transforms_and_greyscale(tmp_path):
    src = _folder(tmp_path / "src")
    convert(str(src), str(tmp_path / "c.zip"), 8, "center-crop", progress=False)
    ds = ImageArchive(str(tmp_path / "c.zip"))
    assert ds.shape == (3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1]
    # center-crop: the central square of the decoded RGB image, Lanczos to 8x8
    with Image.open(src / "a" / "0.png") as im:
        arr = np.asarray(im.convert("RGB"))
    s = min(arr.shape[:2])
    top, left = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
    want = Image.fromarray(arr[top : top + s, left : left + s]).resize((8, 8), Image.LANCZOS)
    assert torch.equal(ds.raw_item(0)[0], torch.from_numpy(np.array(want)).permute(2, 0, 1))
    grey = convert(str(src), str(tmp_path / "g"), 8, "center-crop", channels=1, progress=False)
    assert grey["format"] == "folder" and ImageArchive(str(tmp_path / "g")).shape == (1, 8, 8)


def test_mixed_sizes_without_a_transform_stop_naming_the_file(tmp_path):
    src = _folder(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"'a/0.png' in .* is 40x30 .* must be square"):
        convert(str(src), str(tmp_path / "x.zip"), progress=False)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.tmp").exists()
    squares = _folder(tmp_path / "squares", sizes=((12, 12), (10, 10)))
    with pytest.raises(ConfigError, match=r"'a/1.jpg' in .* is 10x10 .* the first image 12x12"):
        convert(str(squares), str(tmp_path / "x.zip"), progress=False)


def test_center_crop_wide_leaves_out_small_images_and_pads(tmp_path):
    src = _folder(tmp_path / "src", sizes=((40, 30), (8, 8)), per_class=2)
    out = convert(str(src), str(tmp_path / "w.zip"), "16x8", "center-crop-wide", progress=False)
    assert out["count"] == 2  # the 8x8 images are too small for a 16-wide band
    x = ImageArchive(str(tmp_path / "w.zip")).raw_item(0)[0]
    assert x.shape == (3, 16, 16) and x[:, :4].eq(0).all() and x[:, 12:].eq(0).all()


def test_dhariwal_crop_halves_with_box_then_bicubic():
    img = np.random.default_rng(1).integers(0, 256, (70, 150, 3), dtype=np.uint8)
    out = center_crop_dhariwal(16, img)
    # 150x70 -> 75x35 -> 37x17 (box, while the short side >= 32), bicubic to 35x16, centre crop
    im = Image.fromarray(img).resize((75, 35), Image.BOX).resize((37, 17), Image.BOX)
    im = im.resize((35, 16), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(im)[:, 9:25])
    with pytest.raises(ConfigError, match="square resolution"):
        make_transform("center-crop-dhariwal", (16, 8))
    with pytest.raises(ConfigError, match="transform='crop'"):
        make_transform("crop", (16, 16))


def test_corrupt_source_file_stops_or_is_skipped(tmp_path, caplog):
    write_dataset(tmp_path / "src", random_images(4, size=8), [0, 1, 2, 3])
    bad = tmp_path / "src" / "00000" / "img00000002.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(ConfigError) as e:
        convert(str(tmp_path / "src"), str(tmp_path / "o.zip"), progress=False)
    assert "'00000/img00000002.png' in" in str(e.value) and "skip_corrupt=true" in str(e.value)
    assert not (tmp_path / "o.zip").exists()
    out = convert(str(tmp_path / "src"), str(tmp_path / "o.zip"), skip_corrupt=True, progress=False)
    assert out["count"] == 3 and "img00000002.png" in caplog.text
    ds = ImageArchive(str(tmp_path / "o.zip"))
    assert ds.labels.tolist() == [0, 1, 3]  # the names keep the source index, as dataset_tool


def test_cifar10_tarball(tmp_path):
    images, labels = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", per_batch=3)
    out = convert(str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "c.zip"), progress=False)
    assert out["count"] == 15 and out["resolution"] == 32
    ds = ImageArchive(str(tmp_path / "c.zip"), num_classes=10)
    assert ds.labels.tolist() == labels
    assert torch.equal(ds.raw_item(7)[0], torch.from_numpy(images[7]).permute(2, 0, 1))
    (tmp_path / "other.tar.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="not the CIFAR-10 python tarball"):
        convert(str(tmp_path / "other.tar.gz"), str(tmp_path / "d.zip"), progress=False)


def test_worker_processes_write_the_same_zip(tmp_path):
    write_dataset(tmp_path / "src", random_images(70, size=8), list(range(70)))
    convert(str(tmp_path / "src"), str(tmp_path / "one.zip"), 4, "center-crop", progress=False)
    convert(str(tmp_path / "src"), str(tmp_path / "two.zip"), 4, "center-crop", num_workers=2,
            progress=False)  # fmt: skip
    with zipfile.ZipFile(tmp_path / "one.zip") as a, zipfile.ZipFile(tmp_path / "two.zip") as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_litdata_output_holds_the_same_images_shuffled(tmp_path):
    from diffusionlab.data.streaming import StreamingImages

    images = random_images(20, size=8)
    write_dataset(tmp_path / "src", images, list(range(20)))
    out = convert(str(tmp_path / "src"), str(tmp_path / "lit"), format="litdata",
                  chunk_bytes="2kB", progress=False)  # fmt: skip
    assert out["shuffle_seed"] == 0 and out["num_classes"] == 20
    ds = StreamingImages(str(tmp_path / "lit"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 20 and len(ds.chunk_sizes) == 3 and ds.num_classes == 20
    order = np.random.default_rng(0).permutation(20)
    for k in (0, 7, 19):
        x, label = ds.raw_item(k)
        assert label == order[k]  # labels are the source indices
        assert torch.equal(x, torch.from_numpy(images[order[k]]).permute(2, 0, 1))
    with pytest.raises(ConfigError, match="shuffle=true is for format=litdata"):
        convert(str(tmp_path / "src"), str(tmp_path / "z.zip"), shuffle=True, progress=False)


def test_the_app_runs_and_errors_in_one_line(tmp_path):
    from hydra import compose, initialize_config_dir

    from diffusionlab.cli.common import user_message
    from diffusionlab.cli.dataset import run
    from diffusionlab.config import CONF_DIR

    write_dataset(tmp_path / "src", random_images(3, size=8), None)
    app = [sys.executable, "-m", "diffusionlab.cli.dataset"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    ok = subprocess.run([*app, "convert", f"source={tmp_path / 'src'}", f"dest={tmp_path / 'o.zip'}",
                         "resolution=4", "transform=center-crop"], capture_output=True, text=True,
                        env=env, cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ImageArchive(str(tmp_path / "o.zip")).shape == (3, 4, 4)
    usage = subprocess.run(app, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert usage.returncode == 1 and "usage: dl-dataset {convert|encode}" in usage.stderr
    overrides = ["command=convert", f"source={tmp_path / 'none'}", "dest=x.zip"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="dataset_tool", overrides=overrides)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert user_message(e.value).startswith("source=") and "does not exist" in str(e.value)


@pytest.mark.parametrize(
    "transform, resolution",
    [
        (None, "16x16"),
        ("center-crop", "16x16"),
        ("center-crop-wide", "16x12"),
        ("center-crop-dhariwal", "16x16"),
    ],  # fmt: skip
)
def test_byte_identical_to_nvlabs_dataset_tool(tmp_path, transform, resolution):
    """Needs DL_EDM2_PATH pointing at a checkout of github.com/NVlabs/edm2."""
    edm2 = os.environ.get("DL_EDM2_PATH")
    if not edm2:
        pytest.skip("DL_EDM2_PATH not set")
    src = _folder(tmp_path / "src", sizes=((40, 30), (30, 40), (33, 33), (64, 48)), per_class=4)
    args = [f"--source={src}", f"--dest={tmp_path / 'edm2.zip'}", f"--resolution={resolution}"]
    args += [f"--transform={transform}"] if transform else []
    res = subprocess.run([sys.executable, "dataset_tool.py", "convert", *args], cwd=edm2,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    convert(str(src), str(tmp_path / "ours.zip"), resolution, transform, progress=False)
    with zipfile.ZipFile(tmp_path / "edm2.zip") as a, zipfile.ZipFile(tmp_path / "ours.zip") as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        for n in a.namelist():
            assert a.read(n) == b.read(n), n  # PNG bytes and dataset.json
    # and the zip NVlabs wrote loads with the same pixels and labels
    theirs, ours = (
        ImageArchive(str(tmp_path / "edm2.zip")),
        ImageArchive(str(tmp_path / "ours.zip")),
    )
    assert theirs.labels.tolist() == ours.labels.tolist() == [0] * 4 + [1] * 4
    assert all(torch.equal(theirs[i][0], ours[i][0]) for i in range(len(ours)))
