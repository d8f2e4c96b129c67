"""REPA: representation alignment of a denoiser block with a frozen encoder (Yu et al. 2024,
"Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than You
Think").

The output of one block of the network ``F`` (read by a forward hook, so every network keeps its
``F(x, c_noise, ...)`` contract) goes through a per-token MLP projector ``h_phi`` and is aligned
with the frozen encoder's patch tokens ``y*`` of the CLEAN image (the image the network is
denoising, before noise):

    L_REPA = -E_n [ cos(h_phi(h_n), y*_n) ]          (REPA eq. 8, mean over the N patch tokens)
    L = L_diffusion + lambda(step) L_REPA            (REPA eq. 9; lambda = 0.5 in the paper)

U-Net feature maps ``[B, C, H, W]`` and transformer tokens ``[B, N, C]`` are both token grids;
the projected grid is resized to the encoder's (area when shrinking, bilinear when growing).
``lambda`` follows a schedule (``constant``, or falling to 0 at step ``until``: ``cutoff``,
``linear``, ``cosine``), since alignment is reported to help early and hurt late. With a frozen
encoder and un-augmented data the targets of every image are computed once at the start of
training and read per sample by its view (``2 * dataset index + flipped``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.errors import ConfigError
from diffusionlab.networks.encoders import PatchEncoder, build_encoder

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cutoff", "linear", "cosine")
CACHE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class RepaSettings:
    """``repa.*``: the ``encoder`` config (name, weights, options) and its token width
    ``encoder_dim``; the network ``block`` whose output is aligned (a submodule path such as
    ``enc.8x8_block0`` or ``blocks.3``, or ``auto``) and its width ``feature_dim`` (null: probed);
    the projector's hidden width; the coefficient and its schedule; the per-image target cache
    (``auto``: when the data is in memory, un-augmented, and the cache under ``cache_max_gb``)."""

    encoder: dict
    encoder_dim: int | None = None
    block: str = "auto"
    feature_dim: int | None = None
    projector_dim: int = 2048
    coefficient: float = 0.5
    schedule: str = "constant"
    until: int | None = None
    cache: str = "auto"
    cache_max_gb: float = 2.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RepaSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"repa.{unknown[0]} is not a REPA setting; use {sorted(known)}")
        settings = cls(**{k: v for k, v in config.items()})
        settings.check()
        return settings

    def check(self) -> None:
        if not isinstance(self.encoder, Mapping) or "name" not in self.encoder:
            raise ConfigError("repa.encoder must be a node with name (domain | dinov2) and weights")
        if not self.coefficient >= 0 or not math.isfinite(self.coefficient):
            raise ConfigError(f"repa.coefficient={self.coefficient} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"repa.schedule={self.schedule!r} must be one of {list(SCHEDULES)}")
        if self.schedule != "constant" and (self.until is None or int(self.until) < 1):
            raise ConfigError(f"repa.schedule={self.schedule} needs repa.until=<step> >= 1")
        if int(self.projector_dim) < 1:
            raise ConfigError(f"repa.projector_dim={self.projector_dim} must be >= 1")
        if str(self.cache) not in CACHE_MODES:
            raise ConfigError(f"repa.cache={self.cache!r} must be one of {list(CACHE_MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def coefficient_at(self, step: int) -> float:
        """lambda at optimizer step ``step``: constant, or falling to 0 at ``until`` (a step,
        linearly, or along a half cosine)."""
        lam = float(self.coefficient)
        if self.schedule == "constant":
            return lam
        frac = min(step / int(self.until), 1.0)
        if self.schedule == "cutoff":
            return lam if frac < 1.0 else 0.0
        if self.schedule == "linear":
            return lam * (1.0 - frac)
        return lam * 0.5 * (1.0 + math.cos(math.pi * frac))


def alignment_loss(h: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative mean cosine similarity of projected tokens ``h`` and encoder tokens
    ``y`` (both ``[B, N, D]``): REPA eq. 8; -1 when they point the same way."""
    return -(F.normalize(h.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1).mean(-1)


def projector(feature_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: a 3-layer MLP with SiLU applied to every token."""
    return nn.Sequential(
        nn.Linear(feature_dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_dim),
    )


def as_tokens(h: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """A block output as tokens ``[B, N, C]`` and its grid: a feature map ``[B, C, H, W]``, or
    transformer tokens ``[B, N, C]`` on a square grid."""
    if h.ndim == 4:
        return h.flatten(2).transpose(1, 2), (h.shape[2], h.shape[3])
    if h.ndim == 3:
        side = math.isqrt(h.shape[1])
        if side * side != h.shape[1]:
            raise ConfigError(f"repa.block gives {h.shape[1]} tokens, not a square grid")
        return h, (side, side)
    raise ConfigError(f"repa.block gives a {tuple(h.shape)} output, not tokens or a feature map")


def resize_tokens(h: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Tokens ``[B, N, D]`` on ``grid`` resampled to ``target``: area when shrinking, bilinear
    when growing."""
    if tuple(grid) == tuple(target):
        return h
    x = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
    mode = "area" if grid[0] >= target[0] and grid[1] >= target[1] else "bilinear"
    x = F.interpolate(x, size=tuple(target), mode=mode)
    return x.flatten(2).transpose(1, 2)


def default_block(net: nn.Module) -> str:
    """The block REPA aligns when ``repa.block=auto``: after a third of a transformer's blocks
    (REPA: 4 of 12 for SiT-B), or a U-Net's last encoder block at its second resolution."""
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return f"blocks.{max(1, len(blocks) // 3) - 1}"
    enc = getattr(net, "enc", None)
    if isinstance(enc, nn.ModuleDict):
        levels: dict[str, list[str]] = {}
        for name in enc:
            res, _, kind = name.partition("_")
            if kind.startswith("block"):
                levels.setdefault(res, []).append(name)
        order = list(levels)
        if order:
            return f"enc.{levels[order[min(1, len(order) - 1)]][-1]}"
    raise ConfigError(
        f"repa.block=auto: no default block for {type(net).__name__}; name one, e.g. "
        "repa.block=enc.8x8_block0 (a submodule of the network)"
    )


class _Probe(Exception):
    def __init__(self, output: Tensor) -> None:
        self.output = output


class FeatureTap:
    """A forward hook on one block that keeps its output while :meth:`capture` is active."""

    def __init__(self, block: nn.Module) -> None:
        self.value: Tensor | None = None
        self.armed = False
        self.probing = False
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.probing:
            raise _Probe(output)
        if self.armed:
            self.value = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[FeatureTap]:
        self.value, self.armed = None, True
        try:
            yield self
        finally:
            self.armed = False

    @torch.no_grad()
    def probe(self, net: nn.Module, shape: tuple[int, ...], label_dim: int) -> Tensor:
        """The block's output for one zero image (in eval mode, drawing nothing from the process
        RNG; the network stops at the block)."""
        param = next(net.parameters())
        x = torch.zeros(1, *shape, dtype=param.dtype, device=param.device)
        labels = torch.zeros(1, label_dim, device=param.device) if label_dim else None
        was_training = net.training
        self.probing = True
        try:
            with torch.random.fork_rng(devices=[]):
                net.eval()(x, torch.zeros(1, device=param.device), class_labels=labels)
        except _Probe as p:
            return p.output
        finally:
            self.probing = False
            net.train(was_training)
        raise ConfigError("repa.block: the network's forward pass never ran that block")


class RepaHead(nn.Module):
    """The projector and the alignment loss of one network; the frozen encoder and the target
    cache are attached at the start of training (:meth:`attach`) and are not in the state dict."""

    def __init__(self, settings: RepaSettings, net: nn.Module, data_shape, label_dim: int):
        super().__init__()
        block = default_block(net) if settings.block == "auto" else settings.block
        try:
            module = net.get_submodule(block)
        except AttributeError:
            raise ConfigError(
                f"repa.block={block!r} is not a submodule of {type(net).__name__}; e.g. "
                f"repa.block={default_block(net)}"
            ) from None
        self.tap = FeatureTap(module)
        feature_dim = settings.feature_dim
        if feature_dim is None:
            feature_dim = as_tokens(self.tap.probe(net, tuple(data_shape), label_dim))[0].shape[-1]
        if settings.encoder_dim is None:
            raise ConfigError("repa.encoder_dim is unset: the training app fills it in")
        self.settings = RepaSettings(
            **{**settings.to_dict(), "block": block, "feature_dim": int(feature_dim)}
        )
        self.projector = projector(
            int(feature_dim), int(settings.projector_dim), int(settings.encoder_dim)
        )
        self._encoder: list[PatchEncoder] = []  # a list: not a submodule, not in the state dict
        self._cache: Tensor | None = None

    @property
    def encoder(self) -> PatchEncoder | None:
        return self._encoder[0] if self._encoder else None

    def use_encoder(self, encoder: PatchEncoder) -> None:
        """An already built encoder for :meth:`attach` (the app builds it to learn its width)."""
        self._encoder = [encoder]

    # ------------------------------------------------------------------ start of training
    def attach(self, encoder: PatchEncoder, images: Tensor | None, hflip: bool, augment: bool):
        """Use ``encoder`` (moved to the projector's device) and, when ``repa.cache`` allows,
        compute the targets of every view of ``images`` (the in-memory dataset) now."""
        if encoder.dim != self.settings.encoder_dim:
            raise ConfigError(
                f"repa.encoder gives {encoder.dim}-d tokens; repa.encoder_dim is "
                f"{self.settings.encoder_dim}"
            )
        device = self.projector[0].weight.device
        self._encoder = [encoder.to(device)]
        self._cache = None
        mode = str(self.settings.cache)
        if mode == "off":
            return
        why = self._no_cache_reason(images, hflip, augment)
        if why:
            if mode == "on":
                raise ConfigError(f"repa.cache=on: {why}; use repa.cache=auto or off")
            log.info("REPA targets computed per step (%s)", why)
            return
        self._cache = self.encode_views(images, hflip, device)
        log.info(
            "REPA targets of %d views cached on %s (%.1f MB)",
            self._cache.shape[0] * self._cache.shape[1],
            device,
            self._cache.numel() * self._cache.element_size() / 2**20,
        )

    def _no_cache_reason(self, images: Tensor | None, hflip: bool, augment: bool) -> str:
        if augment:
            return "augment is on: augmented images have no fixed targets"
        if images is None:
            return "the dataset is not held in memory"
        n = images.shape[0] * (2 if hflip else 1)
        tokens = self.encoder.grid[0] * self.encoder.grid[1]
        gb = n * tokens * self.settings.encoder_dim * 4 / 1e9
        if gb > float(self.settings.cache_max_gb):
            return f"the targets would take {gb:.1f} GB > repa.cache_max_gb"
        return ""

    @torch.no_grad()
    def encode_views(self, images: Tensor, hflip: bool, device, batch: int = 256) -> Tensor:
        """Targets ``[N, views, T, D]`` of every image (and its mirror image when ``hflip``)."""
        out = []
        for start in range(0, images.shape[0], batch):
            x = images[start : start + batch].to(device)
            views = [x, x.flip(-1)] if hflip else [x]
            out.append(torch.stack([self.encoder(v).float() for v in views], dim=1))
        return torch.cat(out)

    # ------------------------------------------------------------------ per step
    def targets(self, x0: Tensor, views: Tensor | None) -> Tensor:
        """The encoder tokens of the clean images ``x0``: from the cache by view, or computed."""
        if self._cache is not None and views is not None:
            views = views.to(self._cache.device)
            return self._cache[views // 2, views % 2 if self._cache.shape[1] == 2 else 0]
        if self.encoder is None:
            raise RuntimeError("RepaHead.attach(encoder) must run before training")
        with torch.no_grad():
            return self.encoder(x0)

    def loss(self, features: Tensor, x0: Tensor, views: Tensor | None = None) -> Tensor:
        """Per-sample alignment loss ``[B]`` of the captured block output ``features`` with the
        targets of the clean images ``x0``."""
        tokens, grid = as_tokens(features)
        h = self.projector(tokens.to(self.projector[0].weight.dtype))
        h = resize_tokens(h, grid, self.encoder.grid if self.encoder else grid)
        y = self.targets(x0, views)
        if h.shape[1] != y.shape[1]:
            raise ConfigError(f"repa: {h.shape[1]} projected tokens vs {y.shape[1]} targets")
        return alignment_loss(h, y)


def build_repa(config: Mapping[str, Any] | None, net: nn.Module, data_shape, label_dim: int):
    """The REPA head of a ``repa`` config for ``net`` (None when REPA is off)."""
    if not config:
        return None
    return RepaHead(RepaSettings.from_dict(config), net, data_shape, label_dim)


def make_encoder(config: Mapping[str, Any], data_shape) -> PatchEncoder:
    """The frozen encoder of ``repa.encoder``, built without drawing from the process RNG."""
    with torch.random.fork_rng(devices=[]):
        return build_encoder(config, tuple(data_shape))
