"""dl-dataset encode and dataset=latents with both VAEs (ours, a tiny random diffusers
AutoencoderKL saved with save_pretrained): EDM2's stored statistics, the normalisation and its
inverse in the decoder, per-sample latent draws, EDM2-made zips, refusals."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from nvlabs_format import random_images, write_dataset

from diffusionlab.data.encode import encode
from diffusionlab.data.latent_archive import EDM2_RAW_STD, LatentArchive, latent_seeds
from diffusionlab.diffusion.noise import StackedRandomGenerator
from diffusionlab.errors import ConfigError
from diffusionlab.networks.autoencoder import AutoencoderKL, LatentDecoder, load_vae
from diffusionlab.training.autoencoder import save_autoencoder

ARCH = {"in_channels": 3, "latent_channels": 4, "channels": 8, "channel_mult": [1, 2],
        "num_res_blocks": 1}  # fmt: skip
IMAGES = random_images(6, size=8)
LABELS = [0, 1, 2, 0, 1, 2]


def _diffusers_vae(folder, seed=0):
    from diffusers import AutoencoderKL as DAE

    torch.manual_seed(seed)
    vae = DAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(params=["ours", "diffusers"])
def vae_path(request, tmp_path):
    if request.param == "diffusers":
        return _diffusers_vae(tmp_path / "sd-vae")
    torch.manual_seed(0)
    path = tmp_path / "ae.ckpt"
    save_autoencoder(path, AutoencoderKL(**ARCH), ARCH, {})
    return path


@pytest.fixture
def images_zip(tmp_path):
    return write_dataset(tmp_path / "img.zip", IMAGES, LABELS)


def _arrays(path) -> list[np.ndarray]:
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".npy"))
        return (
            [np.load(io.BytesIO(z.read(n))) for n in names],
            names,
            json.loads(z.read("dataset.json")),
        )


def test_encode_stores_edm2_mean_std_and_exact_statistics(tmp_path, images_zip, vae_path):
    summary = encode(str(images_zip), str(tmp_path / "lat.zip"), str(vae_path), batch_size=4,
                     progress=False)  # fmt: skip
    arrays, names, meta = _arrays(tmp_path / "lat.zip")
    assert names[0] == "00000/img-mean-std-00000000.npy" and len(arrays) == 6
    assert arrays[0].dtype == np.float32 and arrays[0].shape == (8, 4, 4)  # [mean; std]
    assert [y for _, y in meta["labels"]] == LABELS
    vae = load_vae(vae_path)
    u = torch.from_numpy(IMAGES).permute(0, 3, 1, 2)
    # the VAE's pixel range: ours [-1, 1]; diffusers [0, 1] as EDM2 (x / 255)
    pixels = u.float() / 127.5 - 1 if vae.kind == "diffusionlab" else u.float() / 255
    mean, std = vae.encode(pixels)
    stored = torch.from_numpy(np.stack(arrays))
    torch.testing.assert_close(stored, torch.cat([mean, std], 1), rtol=1e-5, atol=1e-6)
    # raw latents mean + std * n: E = E[mean], Var = Var[mean] + E[std^2], per channel
    m, s = stored[:, :4].double(), stored[:, 4:].double()
    want_mean = m.mean((0, 2, 3))
    want_std = (m.var((0, 2, 3), unbiased=False) + s.square().mean((0, 2, 3))).sqrt()
    info = meta["diffusionlab"]
    torch.testing.assert_close(torch.tensor(info["raw_mean"]).double(), want_mean)
    torch.testing.assert_close(torch.tensor(info["raw_std"]).double(), want_std)
    assert info["image_shape"] == [3, 8, 8] and summary["vae"]["sha256"] == vae.sha256


def test_latents_normalise_and_the_decoder_inverts_it(tmp_path, images_zip, vae_path):
    encode(str(images_zip), str(tmp_path / "lat.zip"), str(vae_path), progress=False)
    ds = LatentArchive(str(tmp_path / "lat.zip"), str(vae_path))
    assert ds.shape == (4, 4, 4) and ds.num_classes == 3 and len(ds) == 6
    info = json.loads(zipfile.ZipFile(tmp_path / "lat.zip").read("dataset.json"))["diffusionlab"]
    # EDM2: z = (raw - raw_mean) / raw_std * 0.5
    raw = torch.from_numpy(ds.raw_item(2)[0].numpy()[:4])
    want = (
        (raw - torch.tensor(info["raw_mean"]).view(-1, 1, 1))
        / torch.tensor(info["raw_std"]).view(-1, 1, 1)
        * 0.5
    )
    torch.testing.assert_close(ds[2][0], want.float(), rtol=1e-5, atol=1e-5)
    # round trip: normalised latent -> LatentDecoder (as the checkpoint rebuilds it) == the VAE's
    # own decode of the raw latent, mapped to [-1, 1] and clamped
    decoder = LatentDecoder.from_record(ds.latent)
    decoder.load_from(ds.autoencoder)
    vae = ds.autoencoder
    with torch.no_grad():
        out = decoder(ds[2][0][None])
        ref = (
            vae.model.decode(raw[None])
            if vae.kind == "diffusionlab"
            else vae.model.decode(raw[None]).sample * 2 - 1
        )
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    # a decoder rebuilt from the record and the state dict (load_from_checkpoint) decodes the same
    rebuilt = LatentDecoder.from_record(json.loads(json.dumps(ds.latent)))
    rebuilt.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(ds[2][0][None]), out)


def test_each_sample_draws_its_latent_from_its_own_seed(tmp_path, images_zip, vae_path):
    encode(str(images_zip), str(tmp_path / "lat.zip"), str(vae_path), progress=False)
    ds = LatentArchive(str(tmp_path / "lat.zip"), str(vae_path))
    x = torch.stack([ds.raw_item(i)[0] for i in range(4)])
    seeds = torch.tensor([11, 12, 13, 14])
    z = ds.prepare_batch(x, seeds)
    alone = ds.prepare_batch(x[2:3], seeds[2:3])
    assert torch.equal(z[2:3], alone)  # independent of the batch it lands in
    assert not torch.equal(z, ds.prepare_batch(x, seeds + 1))
    mean, std = x.chunk(2, 1)
    noise = StackedRandomGenerator(latent_seeds([11, 12, 13, 14])).randn(mean.shape)
    scale = torch.from_numpy(ds.scale).view(1, -1, 1, 1)
    torch.testing.assert_close(z, (mean + std * noise) * scale + torch.from_numpy(ds.bias).view(
        1, -1, 1, 1))  # fmt: skip
    # the draw's stream is not the loss noise's: seed s gives other numbers there
    assert not torch.allclose(noise, StackedRandomGenerator([11, 12, 13, 14]).randn(mean.shape))


def test_pixel_range_of_a_diffusers_vae_can_be_its_training_range(tmp_path, images_zip):
    vae_dir = _diffusers_vae(tmp_path / "sd-vae")
    encode(str(images_zip), str(tmp_path / "lat.zip"), str(vae_dir), pixel_range=[-1, 1],
           progress=False)  # fmt: skip
    arrays, _, meta = _arrays(tmp_path / "lat.zip")
    vae = load_vae(vae_dir)
    pixels = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(torch.from_numpy(arrays[1][:4]), vae.encode(pixels)[0][1],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert meta["diffusionlab"]["pixel_range"] == [-1.0, 1.0]
    ds = LatentArchive(str(tmp_path / "lat.zip"), str(vae_dir))
    assert ds.latent["pixel_range"] == [-1.0, 1.0]
    with pytest.raises(ConfigError, match="our autoencoder takes images in"):
        load_vae(_ours(tmp_path), pixel_range=[0, 1])


def _ours(tmp_path):
    path = tmp_path / "ours.ckpt"
    save_autoencoder(path, AutoencoderKL(**ARCH), ARCH, {})
    return path


def test_an_edm2_made_zip_uses_edm2_constants(tmp_path):
    """EDM2's dataset_tool.py encode writes the arrays and the labels, nothing else."""
    vae_dir = _diffusers_vae(tmp_path / "sd-vae")
    arrays = np.random.default_rng(0).normal(size=(3, 8, 4, 4)).astype(np.float32)
    arrays[:, 4:] = np.abs(arrays[:, 4:])
    with zipfile.ZipFile(tmp_path / "edm2.zip", "w") as z:
        labels = []
        for i, a in enumerate(arrays):
            name = f"00000/img-mean-std-{i:08d}.npy"
            buf = io.BytesIO()
            np.save(buf, a)
            z.writestr(name, buf.getvalue())
            labels.append([name, i])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    ds = LatentArchive(str(tmp_path / "edm2.zip"), str(vae_dir))
    np.testing.assert_allclose(ds.scale, 0.5 / np.asarray(EDM2_RAW_STD, np.float32))
    assert ds.latent["pixel_range"] == [0.0, 1.0] and ds.num_classes == 3
    assert ds.latent["image_shape"] == [3, 8, 8]


def test_refusals_name_the_key(tmp_path, images_zip):
    vae_a, vae_b = _diffusers_vae(tmp_path / "a", seed=0), _diffusers_vae(tmp_path / "b", seed=1)
    encode(str(images_zip), str(tmp_path / "lat.zip"), str(vae_a), progress=False)
    with pytest.raises(ConfigError, match="was encoded by another VAE"):
        LatentArchive(str(tmp_path / "lat.zip"), str(vae_b))
    with pytest.raises(ConfigError, match="dataset.resolution=8 but the latents .* are 4x4x4"):
        LatentArchive(str(tmp_path / "lat.zip"), str(vae_a), resolution=8)
    with pytest.raises(ConfigError, match="dataset.vae=.* is neither"):
        LatentArchive(str(tmp_path / "lat.zip"), str(tmp_path))
    with pytest.raises(ConfigError, match="dataset.source.path"):
        _ = LatentArchive(str(tmp_path / "lat.zip"), str(vae_a)).source
    with pytest.raises(ConfigError, match="vae=.* holds no diffusion_pytorch_model"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "config.json").write_text("{}")
        load_vae(tmp_path / "c")
