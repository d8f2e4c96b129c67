"""The generator: one path from a trained denoiser to images, used by every app and callback.

denoiser -> conditioning and guidance (classifier-free, or autoguidance by a weaker ``guide``) ->
the sampler spec's grid and sampler -> images in [-1, 1] (a latent model's samples decoded). Noise
and conditions are drawn per sample index from its own seed (EDM generate.py), so images do not
depend on batching. The generator is also a torch-fidelity ``GenerativeModelBase``, whose
``forward(z, labels)`` returns uint8 RGB images."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_fidelity.generative_model_base import GenerativeModelBase

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.guidance import (
    cfg_denoiser,
    check_guidance_interval,
    interval_denoiser,
    label_cfg_denoiser,
)
from diffusionlab.diffusion.noise import Generator, StackedRandomGenerator
from diffusionlab.diffusion.parameterizations import ConsistencyParam
from diffusionlab.diffusion.samplers import Denoise
from diffusionlab.errors import ConfigError
from diffusionlab.sampling.conditioning import (
    CondDenoise,
    Condition,
    Encoded,
    condition_of,
    conditioned,
)
from diffusionlab.sampling.images import to_uint8_rgb
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.stopping import stoppable
from diffusionlab.training.module import DiffusionModule


def denoiser_of(module: DiffusionModule, use_ema: bool = True) -> nn.Module:
    """The module's EMA denoiser (``use_ema``) or its trained weights."""
    return module.ema if use_ema else module.denoiser


class DiffusionGenerator(GenerativeModelBase):
    """Images from ``denoise(x, sigma, cond)`` on ``schedule`` with the sampler ``spec``.

    ``condition`` is the model's condition kind (None: unconditional); ``cond`` is its encoded
    value. ``guidance`` w != 1 applies classifier-free guidance (the condition's null input is the
    unconditional model), or autoguidance when ``guide`` (a weaker denoiser with the same
    signature, given the same condition) is set: D_guide + w (D - D_guide). ``decode`` maps
    samples of ``shape`` to images (a latent model's decoder). ``dtype`` is the sampler's working
    precision (float64 reproduces EDM generate.py's sampler). ``guidance_interval``
    ``(sigma_lo, sigma_hi)`` limits either guidance to sigma in (lo, hi] (Kynkaanniemi et al.
    2024); None guides at every sigma.

    Conditions (docs/conditioning.md): ``negative`` is a condition value (a negative prompt)
    whose encoding replaces the null input as CFG's baseline; ``guide_encode(values,
    generator)`` encodes values for the guide when its encoding differs from the model's (a
    guide with its own trained text encoder, or an unconditional guide: None); unset, the
    guide gets the model's encoded condition."""

    def __init__(
        self,
        denoise: CondDenoise,
        schedule: Any,
        shape: Sequence[int],
        condition: Condition | None = None,
        spec: SamplerSpec | None = None,
        guidance: float = 1.0,
        device: torch.device | str = "cpu",
        decode: Callable[[Tensor], Tensor] | None = None,
        guide: CondDenoise | None = None,
        dtype: torch.dtype = torch.float32,
        guidance_interval: Sequence[float] | None = None,
        negative: Any = None,
        guide_encode: Callable[[Any, Any], Encoded | None] | None = None,
    ) -> None:
        super().__init__()
        self.denoise = denoise
        self.schedule = schedule
        self.shape = tuple(int(s) for s in shape)
        self.condition = condition
        self.spec = spec or SamplerSpec()
        self.guidance = float(guidance)
        self.guide = guide
        self.device = torch.device(device)
        self.decode = decode
        self.dtype = dtype
        self.guidance_interval = check_guidance_interval(guidance_interval)
        self.negative = negative
        self.guide_encode = guide_encode

    @classmethod
    def from_module(
        cls,
        module: DiffusionModule,
        spec: SamplerSpec | dict | None = None,
        guidance: float = 1.0,
        use_ema: bool = True,
        guide: DiffusionModule | nn.Module | None = None,
        guidance_interval: Sequence[float] | None = None,
        negative: Any = None,
    ) -> DiffusionGenerator:
        """The generator of a trained module's (EMA) denoiser, its condition kind, schedule, data
        shape and decoder (``spec`` a spec or sampler config; None: all defaults); ``guide`` is a weaker module (its EMA when ``use_ema``, see
        :func:`~diffusionlab.sampling.checkpoint.load_guide`) or denoiser for autoguidance;
        ``guidance_interval`` the sigma range where guidance applies (None: everywhere);
        ``negative`` a negative prompt (CFG's baseline instead of the empty condition)."""
        condition = condition_of(module, use_ema)
        if guidance != 1.0 and condition is None and guide is None:
            raise ConfigError(
                f"guidance={guidance} needs a conditional model (label_dim > 0, or cond=text / "
                "image) or a guide_ckpt (autoguidance)"
            )
        guide_condition, guide_encode = condition, None
        if isinstance(guide, DiffusionModule):
            guide_condition = condition_of(guide, use_ema)
            guide = denoiser_of(guide, use_ema)
        elif guide is not None:  # a denoiser of the same run (the grid's early EMA)
            guide_condition = condition_of(module, use_ema, denoiser=guide)
        if guide is not None and not (
            condition is None or condition.same_encoding(guide_condition)
        ):
            guide_encode = _encoder_for(guide_condition)
        spec = None if spec is None else SamplerSpec.of(spec)
        param = module.denoiser.parameterization
        if (
            spec is not None
            and spec.name == "consistency"
            and not isinstance(param, ConsistencyParam)
        ):
            raise ConfigError(
                f"sampler=consistency samples consistency models (parameterization=consistency); "
                f"this checkpoint's parameterization is {type(param).__name__}: sample it with an "
                "ODE or SDE sampler (sampler=heun, edm, dpmpp_2m, ...)"
            )
        return cls(
            conditioned(denoiser_of(module, use_ema), condition),
            module.schedule,
            module.data_shape,
            condition,
            spec,
            guidance,
            module.device,
            module.decoder,
            None if guide is None else conditioned(guide, guide_condition),
            getattr(module, "sample_dtype", torch.float32),
            guidance_interval=guidance_interval,
            negative=negative,
            guide_encode=guide_encode,
        )

    # ------------------------------------------------------------------ torch-fidelity
    @property
    def z_size(self) -> int:
        return math.prod(self.shape)

    @property
    def z_type(self) -> str:
        return "normal"

    @property
    def num_classes(self) -> int:
        return self.condition.num_classes if self.condition is not None else 0

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return to_uint8_rgb(self.sample_images(z.view(-1, *self.shape), labels))

    # ------------------------------------------------------------------ inputs
    def noise_generator(
        self, seeds: Sequence[int], device: torch.device | str | None = None
    ) -> StackedRandomGenerator | BatchedGenerator:
        """The per-sample noise source of ``seeds`` (the spec's noise kind), on ``device``
        (default the model's)."""
        return self.spec.noise_generator(seeds, self.device if device is None else device)

    def seeded_noise(
        self, seeds: Sequence[int]
    ) -> tuple[Tensor, StackedRandomGenerator | BatchedGenerator]:
        """Standard-normal noise [len(seeds), *shape], row i from ``seeds[i]``, and the generator
        the sampler keeps drawing from."""
        gen = self.noise_generator(seeds)
        return gen.randn((len(seeds), *self.shape)), gen

    def seeded_inputs(
        self, seeds: Sequence[int], class_label: Any = None
    ) -> tuple[Tensor, Tensor | None, StackedRandomGenerator | BatchedGenerator]:
        """Noise, conditions and the per-sample generator for ``seeds``: row i depends on seeds[i]
        only. Conditions are drawn from each sample's generator after its noise (EDM
        generate.py), also when ``class_label`` then fixes them, so a stochastic sampler's noise
        that follows is EDM's; None for unconditional models."""
        noise, gen = self.seeded_noise(seeds)
        labels = None
        if self.condition is not None:
            if self.condition.drawable or class_label is None:
                labels = self.condition.draw(gen, self.device)
            if class_label is not None:
                labels = self.condition.fixed(class_label, len(seeds), self.device)
        return noise, labels, gen

    def encode(self, labels: Tensor | None, generator: Generator = None) -> Encoded | None:
        """Condition values -> the network's input (None for unconditional models);
        ``generator``: the samples' own, for kinds that draw while encoding (image noise)."""
        if self.condition is None or labels is None:
            return None
        return self.condition.encode_seeded(labels.to(self.device), generator)

    def unconditional(self, cond: Encoded) -> Encoded:
        """CFG's baseline for a batch of encoded conditions: the encoded negative prompt when
        set, else the condition's null input."""
        if self.negative is None:
            return self.condition.null(cond)
        n = (next(iter(cond.values())) if isinstance(cond, dict) else cond).shape[0]
        return self.condition.encode(self.condition.fixed(self.negative, n, self.device))

    # ------------------------------------------------------------------ sampling
    def denoiser(self, cond: Encoded | None = None, guide_cond: Encoded | None = None) -> Denoise:
        """``denoise(x, sigma)`` for the encoded condition ``cond`` with guidance applied (within
        ``guidance_interval`` when set): the function the sampler (or an editing method) sees;
        ``guide_cond`` is the guide's own encoding when it differs (``guide_encode``). Every call
        is a stop point (``diffusionlab.stopping``): a stop signal ends sampling within one
        network evaluation."""
        return stoppable(self._guided(cond, guide_cond))

    def _guided(self, cond: Encoded | None, guide_cond: Encoded | None) -> Denoise:
        def plain(x: Tensor, sigma: Tensor, **kw: Tensor) -> Tensor:
            return self.denoise(x, sigma, cond, **kw)

        if self.guide is not None:  # autoguidance, Karras et al. 2024 eq. 1
            guide = self.guide
            if self.guide_encode is None:
                guide_cond = cond
            guided = cfg_denoiser(
                plain, lambda x, sigma, **kw: guide(x, sigma, guide_cond, **kw), self.guidance
            )
        elif cond is not None and self.guidance != 1.0:
            guided = label_cfg_denoiser(self.denoise, cond, self.guidance, self.unconditional(cond))
        else:
            return plain
        if self.guidance_interval is None:
            return guided
        return interval_denoiser(guided, plain, *self.guidance_interval)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        cond: Encoded | None = None,
        generator: Generator = None,
        guide_cond: Encoded | None = None,
    ) -> Tensor:
        """Run the sampler from standard-normal ``noise`` [B, *shape] with the encoded condition
        ``cond`` (then ``decode``); images in [-1, 1]."""
        x = self.spec.sample(
            self.denoiser(cond, guide_cond),
            self.schedule,
            noise.to(self.device, self.dtype),
            generator=generator,
        )
        return x if self.decode is None else self.decode(x)

    def sample_images(
        self, noise: Tensor, labels: Tensor | None = None, generator: Generator = None
    ) -> Tensor:
        """:meth:`sample` with condition values (class labels, prompt indices, images),
        encoded here (and for the guide by ``guide_encode``)."""
        cond = self.encode(labels, generator)
        guide_cond = None
        if self.guide_encode is not None and labels is not None:
            guide_cond = self.guide_encode(labels.to(self.device), generator)
        return self.sample(noise, cond, generator, guide_cond)

    def generate(self, seeds: Sequence[int], class_label: Any = None) -> Tensor:
        """Images in [-1, 1] for ``seeds``, independent of how seeds are batched;
        ``class_label``: a condition value for all of them (a class, a prompt, an image)."""
        noise, labels, gen = self.seeded_inputs(seeds, class_label)
        return self.sample_images(noise, labels, gen)


def _encoder_for(condition: Condition | None) -> Callable[[Any, Any], Encoded | None]:
    """``encode(values, generator)`` of a guide's condition (None for an unconditional guide)."""
    if condition is None:
        return lambda values, generator: None
    return condition.encode_seeded


def generate(
    module: DiffusionModule,
    seeds: Sequence[int],
    class_labels: Tensor | None = None,
    sampler: SamplerSpec | dict | None = None,
    use_ema: bool = True,
    guide: DiffusionModule | nn.Module | None = None,
    guidance: float = 1.0,
    guidance_interval: Sequence[float] | None = None,
    conditions: Tensor | None = None,
) -> Tensor:
    """Samples of a trained module in [-1, 1] for ``seeds`` (one per image, independent of
    batching), decoded to images for a latent model. ``class_labels`` are encoded conditions
    (one-hot, or None: unconditioned), or ``conditions`` their values (encoded here, for the
    guide too); ``sampler`` a spec or config (default: the run's, stored in the checkpoint);
    with a ``guide``, autoguidance with weight ``guidance`` (within ``guidance_interval`` when
    set)."""
    spec = SamplerSpec.of(sampler if sampler is not None else module.hparams.sampler)
    gen = DiffusionGenerator.from_module(
        module, spec, guidance, use_ema, guide, guidance_interval=guidance_interval
    )
    noise, noise_gen = gen.seeded_noise(seeds)
    if conditions is not None:
        return gen.sample_images(noise, conditions, noise_gen)
    return gen.sample(noise, class_labels, noise_gen)
