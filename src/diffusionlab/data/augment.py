"""EDM's non-leaking geometric augmentation (Karras et al. 2022, App. F.2; after ADA, Karras et al.
2020, App. B): x/y flips, integer rotation and translation (pixel blitting), then isotropic
scaling, rotation, anisotropic scaling and fractional translation as one affine warp.

Each transform is applied with probability ``p * multiplier`` and its parameters form the
*augment labels* the network is conditioned on; at sampling the labels are zero, so the model
generates un-augmented images. All parameters of sample ``i`` come from its own streams of the
training step's batched generator (a fixed number of draws whatever the settings), and each
sample is warped on its own fixed padding, so a sample's augmentation does not depend on the batch
it is in. On an accelerator the parameters are computed there and nothing waits for the device
(no data-dependent branch): every sample goes through the warp and keeps it only if it moved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusionlab.diffusion.batched_rng import BatchedGenerator
from diffusionlab.diffusion.seeds import AUGMENT_NORMAL_STREAM, AUGMENT_UNIFORM_STREAM
from diffusionlab.errors import ConfigError

# Daubechies symlet-6 low-pass filter: the anti-aliasing filter of the 2x up/down-sampled warp.
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
# the filter's centroid less the centre its convolution padding assumes (0.098 fine pixels)
_SYM6_DELAY = sum(k * h for k, h in enumerate(SYM6)) / sum(SYM6) - (len(SYM6) - 1) // 2
_MARGIN = len(SYM6) // 4  # extra pixels each side so the filters see no output border

# devices where only the samples that moved are warped (a data-dependent branch, read on the
# host); elsewhere every sample is warped and the moved ones kept, so nothing waits for the device
SELECTIVE_WARP_DEVICES = {"cpu"}
# fixed per-sample draws: uniforms and normals, one slot per use (see AugmentPipe.draw)
_NUM_UNIFORM = 16
_NUM_NORMAL = 4


def _affine(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """Batched 3x3 matrices ``[N, 3, 3]`` from rows of per-sample tensors or constants."""
    elems = [
        e if isinstance(e, Tensor) else torch.full_like(like, float(e)) for r in rows for e in r
    ]
    return torch.stack(elems, dim=-1).reshape(*like.shape, 3, 3)


def translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    return _affine([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    return _affine([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: Tensor) -> Tensor:
    c, s = theta.cos(), theta.sin()
    return _affine([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


class AugmentPipe:
    """Geometric augmentation with its 9-d (EDM CIFAR-10 settings) label vector.

    ``p`` scales every probability multiplier (EDM's ``--augment``); a multiplier of 0 disables
    a transform and drops its labels. Label layout, in order, for the enabled transforms:
    xflip ``[w]``, yflip ``[w]``, rotate_int ``[odd-or-2, 2-or-3]``, translate_int
    ``[tx, ty]`` (relative to ``translate_int_max``), scale ``[log2 s / scale_std]``,
    rotate_frac ``[cos t - 1, sin t]``, aniso ``[w cos r, w sin r]``, translate_frac
    ``[tx, ty]`` (in units of ``translate_frac_std``). All zeros = no augmentation.
    """

    def __init__(
        self,
        p: float = 1.0,
        xflip: float = 0,
        yflip: float = 0,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ) -> None:
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.rotate_int, self.translate_int = float(rotate_int), float(translate_int)
        self.translate_int_max = float(translate_int_max)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @property
    def label_dim(self) -> int:
        """Length of the augment label vector (the network's ``augment_dim``)."""
        sizes = {
            "xflip": 1,
            "yflip": 1,
            "rotate_int": 2,
            "translate_int": 2,
            "scale": 1,
            "rotate_frac": 2,
            "aniso": 2,
            "translate_frac": 2,
        }
        return sum(n for name, n in sizes.items() if getattr(self, name) > 0)

    @staticmethod
    def draw(
        n: int, generator: BatchedGenerator | None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """``[n, 16]`` uniforms and ``[n, 4]`` normals: row ``i`` from sample ``i``'s augment
        streams (the global RNG on ``device`` when None). Always the same number of draws, so
        changing one setting does not change the other transforms of a sample."""
        if generator is None:
            u = torch.rand(n, _NUM_UNIFORM, device=device)
            return u, torch.randn(n, _NUM_NORMAL, device=device)
        if len(generator) != n:
            raise ValueError(f"batch size {n} != number of keys {len(generator)}")
        u = generator.uniform((_NUM_UNIFORM,), AUGMENT_UNIFORM_STREAM)
        return u, generator.normal((_NUM_NORMAL,), AUGMENT_NORMAL_STREAM)

    def __call__(
        self, images: Tensor, generator: BatchedGenerator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment NCHW ``images``; returns ``(images, labels [N, label_dim])``."""
        if images.ndim != 4:
            raise ValueError(f"augmentation needs NCHW images, got shape {tuple(images.shape)}")
        n, _, h, w = images.shape
        dev = images.device
        u, z = self.draw(n, generator, dev)
        u, z = u.to(dev, torch.float64), z.to(dev, torch.float64)
        labels: list[Tensor] = []

        def gate(slot: int, multiplier: float) -> Tensor:
            return u[:, slot] < multiplier * self.p

        # ---- pixel blitting (exact)
        flips = torch.zeros(n, 2, dtype=torch.bool, device=dev)
        if self.xflip > 0:
            flips[:, 1] = gate(0, self.xflip) & (u[:, 1] < 0.5)
            labels.append(flips[:, 1:2].double())
        if self.yflip > 0:
            flips[:, 0] = gate(2, self.yflip) & (u[:, 3] < 0.5)
            labels.append(flips[:, 0:1].double())
        quarter = None
        if self.rotate_int > 0:
            quarter = torch.where(gate(4, self.rotate_int), (u[:, 5] * 4).long().clamp(max=3), 0)
            labels += [((quarter == 1) | (quarter == 2))[:, None].double()]
            labels += [((quarter == 2) | (quarter == 3))[:, None].double()]
        shift = None
        if self.translate_int > 0:
            t = torch.where(gate(6, self.translate_int)[:, None], u[:, 7:9] * 2 - 1, 0.0)
            tx = (t[:, 0] * w * self.translate_int_max).round()
            ty = (t[:, 1] * h * self.translate_int_max).round()
            shift = torch.stack([tx, ty], dim=1).long()
            labels.append(torch.stack([tx / w, ty / h], dim=1) / self.translate_int_max)
        images = self._blit(images, flips, quarter, shift)

        # ---- geometric warp: G maps output to input pixel coordinates (centred, y down)
        eye = torch.eye(3, dtype=torch.float64, device=dev).expand(n, 3, 3)
        g_inv = eye
        zero = torch.zeros(n, dtype=torch.float64, device=dev)
        if self.scale > 0:
            s_log = torch.where(gate(9, self.scale), z[:, 0], zero)
            s = (s_log * self.scale_std).exp2()
            g_inv = g_inv @ scale2d(1 / s, 1 / s)
            labels.append(s_log[:, None])
        if self.rotate_frac > 0:
            theta = (u[:, 11] * 2 - 1) * math.pi * self.rotate_frac_max
            theta = torch.where(gate(10, self.rotate_frac), theta, zero)
            g_inv = g_inv @ rotate2d(theta)
            labels.append(torch.stack([theta.cos() - 1, theta.sin()], dim=1))
        if self.aniso > 0:
            on = gate(12, self.aniso)
            a_log = torch.where(on, z[:, 1], zero)
            # the frame rotation only where the scaling happens: others stay exactly unwarped
            on = on & (u[:, 13] < self.aniso_rotate_prob)
            r = torch.where(on, (u[:, 14] * 2 - 1) * math.pi, zero)
            s = (a_log * self.aniso_std).exp2()
            g_inv = g_inv @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
            labels.append(torch.stack([a_log * r.cos(), a_log * r.sin()], dim=1))
        if self.translate_frac > 0:
            t = torch.where(gate(15, self.translate_frac)[:, None], z[:, 2:4], 0.0)
            g_inv = g_inv @ translate2d(
                -t[:, 0] * w * self.translate_frac_std, -t[:, 1] * h * self.translate_frac_std
            )
            labels.append(t)
        warps = (self.scale, self.rotate_frac, self.aniso, self.translate_frac)
        if any(m > 0 for m in warps):
            moved = (g_inv - eye).abs().amax(dim=(1, 2)) > 0
            if dev.type in SELECTIVE_WARP_DEVICES:  # warp only the samples that moved
                if moved.any():
                    idx = moved.nonzero().squeeze(1)
                    warped = warp(images.index_select(0, idx), g_inv[moved])
                    images = images.index_copy(0, idx, warped.to(images.dtype))
            else:  # no data-dependent shapes: warp all, keep the moved ones
                warped = warp(images, g_inv).to(images.dtype)
                images = torch.where(moved.view(-1, 1, 1, 1), warped, images)

        out = torch.cat(labels, dim=1) if labels else u.new_zeros(n, 0)
        return images, out.float()

    @staticmethod
    def _blit(
        images: Tensor, flips: Tensor, quarter: Tensor | None, shift: Tensor | None
    ) -> Tensor:
        """Flips, quarter turns (x-flip, y-flip, transpose as in ADA; None = off) and integer
        shifts with reflection at the borders (None = off); samples whose parameters are all
        zero are left untouched."""
        dev = images.device

        def col(mask: Tensor) -> Tensor:  # per-sample mask -> broadcastable over C, H, W
            return mask.view(-1, 1, 1, 1)

        x_flip, y_flip = flips[:, 1], flips[:, 0]
        if quarter is not None:
            x_flip = x_flip | (quarter == 1) | (quarter == 2)
            y_flip = y_flip | (quarter == 2) | (quarter == 3)
        images = torch.where(col(x_flip), images.flip(3), images)
        images = torch.where(col(y_flip), images.flip(2), images)
        if quarter is not None:  # a transpose needs square images (rotate_int)
            images = torch.where(col(quarter % 2 == 1), images.transpose(2, 3), images)
        if shift is not None:
            _, _, h, w = images.shape
            x = torch.arange(w, device=dev)[None, :] - shift[:, :1]  # out[x] = in[x - tx]
            y = torch.arange(h, device=dev)[None, :] + shift[:, 1:]  # out[y] = in[y + ty]
            x = (w - 1) - ((w - 1) - x % (2 * w - 2)).abs()  # reflect into [0, w-1]
            y = (h - 1) - ((h - 1) - y % (2 * h - 2)).abs()
            rows = images.gather(2, y[:, None, :, None].expand(-1, images.shape[1], -1, w))
            images = rows.gather(3, x[:, None, None, :].expand(-1, images.shape[1], h, -1))
        return images


@functools.cache
def _sym6(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The filter taps on ``device`` (copied there once, not at every step)."""
    return torch.tensor(SYM6, dtype=dtype).to(device)


def _filter_2x(images: Tensor, up: bool) -> Tensor:
    """Separable SYM6 2x upsampling (zero insertion + filter) or filtering + 2x downsampling."""
    n, c, h, w = images.shape
    taps = _sym6(images.device, images.dtype)
    if up:
        kernel = taps.flip(0).view(1, 1, -1).repeat(c, 1, 1)
        pad = (len(SYM6) + 1) // 2
        x = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(n, c, h, 2 * w)[..., :-1]
        x = F.conv2d(x, kernel[:, :, None, :], groups=c, padding=(0, pad))
        x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(n, c, 2 * h, 2 * w)[:, :, :-1]
        return F.conv2d(x, kernel[:, :, :, None], groups=c, padding=(pad, 0))
    kernel = taps.view(1, 1, -1).repeat(c, 1, 1)
    pad = (len(SYM6) - 1) // 2
    x = F.conv2d(images, kernel[:, :, None, :], groups=c, stride=(1, 2), padding=(0, pad))
    return F.conv2d(x, kernel[:, :, :, None], groups=c, stride=(2, 1), padding=(pad, 0))


def warp(images: Tensor, g_inv: Tensor) -> Tensor:
    """Resample each image at ``g_inv @ (x, y, 1)`` for its output pixel centres (centred
    coordinates): reflect-pad by the image size, 2x upsample, bilinear ``grid_sample``, 2x
    downsample (ADA's anti-aliased warp). The padding is fixed, so the result of one image does
    not depend on the others in the batch."""
    n, c, h, w = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"cannot warp images of size {h}x{w}")
    padded = F.pad(images, [w - 1, w - 1, h - 1, h - 1], mode="reflect")
    up = _filter_2x(padded, up=True)
    # output grid: the image plus a margin for the down-sampling filter, at 2x resolution
    ho, wo = 2 * (h + 2 * _MARGIN), 2 * (w + 2 * _MARGIN)

    g_inv = g_inv.to(images.device, torch.float64)

    def const(*v: float) -> list[Tensor]:
        return [torch.full((n,), float(x), dtype=torch.float64, device=g_inv.device) for x in v]

    # centred coordinates: fine pixel c sits at coarse 2 x - 1/2 + delay in both ``up`` and the
    # grid that is down-sampled (zero insertion / decimation and the filter's DC group delay)
    shift = _SYM6_DELAY - 0.5
    to_up = translate2d(*const(shift, shift)) @ scale2d(*const(2, 2))
    from_out = scale2d(*const(0.5, 0.5)) @ translate2d(*const(-shift, -shift))
    g = to_up @ g_inv @ from_out
    # normalised coordinates (align_corners=False): u = 2 x / size for centred x
    g = scale2d(*const(2 / up.shape[3], 2 / up.shape[2])) @ g @ scale2d(*const(wo / 2, ho / 2))
    theta = g[:, :2, :].to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, c, ho, wo], align_corners=False)
    out = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = _filter_2x(out, up=False)
    return out[:, :, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]


def check_augment(pipe: AugmentPipe | None, augment_dim: int, data_shape: Sequence[int]) -> None:
    """Stop early when the augmentation cannot run on this data or model."""
    if pipe is None:
        return
    if len(data_shape) != 3:
        raise ConfigError(
            f"augment needs image data (C, H, W); the dataset has samples of shape "
            f"{tuple(data_shape)}: use augment=none"
        )
    if pipe.rotate_int > 0 and data_shape[1] != data_shape[2]:
        raise ConfigError(f"augment.rotate_int needs square images, not {tuple(data_shape[1:])}")
    if augment_dim != pipe.label_dim:
        raise ConfigError(
            f"model.augment_dim={augment_dim} but the augmentation gives {pipe.label_dim} "
            f"labels per image; set model.augment_dim={pipe.label_dim}"
        )
