"""Text and image conditions (training/conditions.py, sampling/conditioning.py): settings checks,
the classifier-free guidance condition drop, noise augmentation, prompts through the one
generator with CFG against the empty or a negative prompt, and frozen transformers encoders read
from a temporary folder (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from test_spec import VAR, shifted_gaussian

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.errors import ConfigError
from diffusionlab.networks.text_encoders import (
    PretrainedTextEncoder,
    TrainableTextEncoder,
    build_text_encoder,
)
from diffusionlab.sampling.conditioning import LowResImages, TextPrompts, conditioned
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.prompts import check_negative, read_prompts_file, requested_prompts
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.training.conditions import (
    ConditionSettings,
    augment_lowres,
    drop_inputs,
    training_inputs,
)
from tiny_text_encoders import tiny_clip, tiny_t5

SHAPE = (1, 16, 16)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "audio"}, "cond.kind='audio' must be one of"),
        ({"kind": "text", "dropout": 1.5}, r"cond.dropout=1.5 must be in \[0, 1\]"),
        ({"kind": "text"}, "cond.cross_attn_resolutions is empty"),
        ({"kind": "image", "factor": 3}, "cond.factor=3 must divide the data resolution 16"),
        ({"kind": "image", "aug_max": -1}, "must be >= 0"),
    ],
)
def test_bad_cond_settings_stop_with_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        ConditionSettings.from_config(cfg, SHAPE)


def test_none_and_class_keep_the_label_path():
    assert ConditionSettings.from_config(None, SHAPE) is None
    assert ConditionSettings.from_config({"kind": "class", "dropout": 0.1}, SHAPE) is None


def test_condition_drop_is_per_sample_at_rate_p_and_batch_independent():
    n = 4000
    inputs = {
        "context": torch.ones(n, 3, 2),
        "context_mask": torch.ones(n, 3, dtype=torch.bool),
        "cond_vector": torch.ones(n, 4),
    }
    out = drop_inputs(inputs, 0.3, BatchedGenerator(torch.arange(n)))
    dropped = out["cond_vector"][:, 0] == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    # a dropped sample is exactly the null input in every tensor, a kept one untouched
    assert (out["context"][dropped] == 0).all() and (out["context"][~dropped] == 1).all()
    assert (~out["context_mask"][dropped]).all() and out["context_mask"][~dropped].all()
    # the mask comes from each sample's own stream: a sub-batch drops the same samples
    part = drop_inputs(
        {k: v[100:200] for k, v in inputs.items()}, 0.3, BatchedGenerator(range(100, 200))
    )
    torch.testing.assert_close(part["cond_vector"], out["cond_vector"][100:200])
    assert drop_inputs(inputs, 0.0, BatchedGenerator(torch.arange(n))) is inputs


def test_noise_augmentation_is_the_vp_forward_process_at_the_level():
    low = torch.full((2, 1, 4, 4), 0.5)
    noise = torch.randn(2, 1, 4, 4)
    sigma = torch.tensor([0.0, 0.75])
    out = augment_lowres(low, sigma, noise)
    torch.testing.assert_close(out["cond_image"][0], low[0])
    torch.testing.assert_close(out["cond_image"][1], (0.5 + 0.75 * noise[1]) / 1.25)
    assert out["cond_vector"].shape == (2, 16)
    assert not torch.equal(out["cond_vector"][0], out["cond_vector"][1])


def test_image_training_inputs_downsample_and_draw_levels_per_sample():
    settings = ConditionSettings.from_config({"kind": "image", "aug_max": 0.5}, SHAPE)
    x0 = torch.randn(64, *SHAPE)
    inputs = training_inputs(settings, None, x0, None, BatchedGenerator(range(64)))
    assert inputs["cond_image"].shape == (64, 1, 8, 8)
    again = training_inputs(settings, None, x0[:8], None, BatchedGenerator(range(8)))
    torch.testing.assert_close(again["cond_image"], inputs["cond_image"][:8])
    # level 0 (aug_max=0): exactly the area-downsampled image
    clean = ConditionSettings.from_config({"kind": "image"}, SHAPE)
    plain = training_inputs(clean, None, x0, None, BatchedGenerator(range(64)))
    torch.testing.assert_close(plain["cond_image"], torch.nn.functional.avg_pool2d(x0, 2))


def test_text_training_inputs_need_captions():
    settings = ConditionSettings.from_config({"kind": "text", "cross_attn_resolutions": [8]}, SHAPE)
    with pytest.raises(ConfigError, match="carry no captions"):
        training_inputs(
            settings, TrainableTextEncoder(), torch.zeros(2, *SHAPE), None, BatchedGenerator([0, 1])
        )


class VectorEncoder:
    """Prompts -> a scalar mean as the pooled vector: ``"mean <v>"``; the empty prompt is 0."""

    context_dim = vector_dim = 1

    def encode(self, captions, device):
        v = torch.tensor([float(c.split()[1]) if c else 0.0 for c in captions], device=device)
        return {"cond_vector": v.double()[:, None]}


def mean_denoiser(x, sigma, cond_vector=None):
    return shifted_gaussian(x, sigma, None if cond_vector is None else cond_vector)


def prompt_generator(guidance: float, negative: str | None = None) -> DiffusionGenerator:
    cond = TextPrompts(VectorEncoder(), ["mean 0.5", "mean -0.5"])
    spec = SamplerSpec(name="heun", nfe=31)
    denoise = conditioned(mean_denoiser, cond)
    return DiffusionGenerator(
        denoise, get_schedule("edm"), (2,), cond, spec, guidance, negative=negative
    )


def test_prompts_guidance_and_negative_prompts_in_closed_form():
    """Exact denoisers of N(m, VAR) data: a prompt gives mean m; CFG with weight w gives
    w m + (1 - w) m_baseline, the baseline being the empty prompt (0) or the negative one."""
    seeds = list(range(400))
    x = prompt_generator(1.0).generate(seeds, "mean 0.8").double()
    assert abs(x.mean().item() - 0.8) < 0.05 and abs(x.var().item() - VAR) < 0.05
    guided = prompt_generator(2.0).generate(seeds, "mean 0.8").double()
    assert abs(guided.mean().item() - 1.6) < 0.05
    negative = prompt_generator(2.0, negative="mean 0.3").generate(seeds, "mean 0.8").double()
    assert abs(negative.mean().item() - 1.3) < 0.05
    # drawn prompts: one of the model's prompts per seed, independent of batching
    gen = prompt_generator(1.0)
    together = gen.generate(seeds[:6])
    torch.testing.assert_close(together, torch.cat([gen.generate([s]) for s in seeds[:6]]))
    _, values, _ = gen.seeded_inputs(seeds)
    assert set(gen.condition.describe(values)) == {"mean 0.5", "mean -0.5"}


def test_prompt_keys_are_checked_against_the_model(tmp_path):
    text = TextPrompts(VectorEncoder(), [])
    with pytest.raises(ConfigError, match="stores no cond.prompts"):
        requested_prompts(text, None, None)
    with pytest.raises(ConfigError, match="prompt=... needs a text-conditioned ckpt"):
        requested_prompts(None, "a seven", None)
    with pytest.raises(ConfigError, match="not both"):
        requested_prompts(text, "a", "b.txt")
    with pytest.raises(ConfigError, match="prompts_file='.*missing.txt' does not read"):
        requested_prompts(text, None, str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="needs a text-conditioned ckpt"):
        check_negative(None, "a one", 3.0, False)
    with pytest.raises(ConfigError, match="set guidance != 1"):
        check_negative(text, "a one", 1.0, False)
    with pytest.raises(ConfigError, match="guide_ckpt"):
        check_negative(text, "a one", 3.0, True)
    f = tmp_path / "prompts.txt"
    f.write_text("# digits\n7\ta handwritten seven\n\nthe digit 1\n")
    prompts = read_prompts_file(f)
    assert [(p.text, p.label) for p in prompts] == [
        ("a handwritten seven", 7),
        ("the digit 1", None),
    ]
    f.write_text("seven\ta seven\n")
    with pytest.raises(ConfigError, match="line 1: 'seven' before the tab is not an integer"):
        read_prompts_file(f)


def test_low_res_images_are_given_not_drawn_and_noised_from_each_seed():
    settings = ConditionSettings.from_config({"kind": "image", "aug_sigma": 0.2}, SHAPE)
    cond = LowResImages(settings)
    with pytest.raises(ConfigError, match="dl-upsample"):
        cond.draw(None, torch.device("cpu"))
    low = torch.zeros(4, 1, 8, 8)
    a = cond.encode_seeded(low, BatchedGenerator(range(4)))
    b = cond.encode_seeded(low[2:], BatchedGenerator(range(2, 4)))
    torch.testing.assert_close(a["cond_image"][2:], b["cond_image"])
    assert a["cond_image"].std() > 0.1
    assert LowResImages(settings, 0.0).encode(low)["cond_image"].abs().max() == 0


@pytest.mark.parametrize("make", [tiny_clip, tiny_t5])
def test_pretrained_encoder_from_a_local_folder(tmp_path, make):
    folder = make(tmp_path / "enc")
    enc = build_text_encoder({"kind": "auto", "path": str(folder), "max_length": 8})
    assert isinstance(enc, PretrainedTextEncoder) and enc.kind == make.__name__[5:]
    out = enc.encode(["a handwritten seven", "digit three", "a handwritten seven"], "cpu")
    assert out["context"].shape == (3, 8, 16) and out["cond_vector"].shape == (3, 16)
    assert out["context_mask"].sum(1).tolist() == [3, 2, 3]
    torch.testing.assert_close(out["context"][0], out["context"][2])
    assert not torch.allclose(out["cond_vector"][0], out["cond_vector"][1])
    assert set(enc.cache) == {"a handwritten seven", "digit three"}
    # the cached rows are what the model computes for the caption alone
    fresh = build_text_encoder(
        {"kind": "auto", "path": str(folder), "max_length": 8, "cache": False}
    )
    torch.testing.assert_close(
        fresh.encode(["digit three"], "cpu")["context"][0], out["context"][1]
    )
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_unreadable_text_encoder_folders_name_the_key_and_file(tmp_path):
    key = "cond.encoder.path"
    with pytest.raises(ConfigError, match=f"{key}='.*nowhere' is not a folder"):
        build_text_encoder({"kind": "clip", "path": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        build_text_encoder({"kind": "clip", "path": str(tmp_path / "empty")})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json does not read"):
        build_text_encoder({"kind": "auto", "path": str(bad)})
    folder = tiny_clip(tmp_path / "noweights")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="CLIPTextModel weights do not load"):
        build_text_encoder({"kind": "clip", "path": str(folder)})
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="holds a 'bert' model"):
        build_text_encoder({"kind": "auto", "path": str(other)})
    with pytest.raises(ConfigError, match="needs cond.encoder.path"):
        build_text_encoder({"kind": "t5"})


def test_trainable_encoder_separates_wordings_and_pads():
    torch.manual_seed(0)
    enc = TrainableTextEncoder(width=16, depth=1, heads=2, max_length=6)
    out = enc.encode(["a handwritten seven", "seven", ""], "cpu")
    assert out["context"].shape == (3, 6, 16) and out["context_mask"].sum(1).tolist() == [3, 1, 0]
    assert not torch.allclose(out["cond_vector"][0], out["cond_vector"][1])
