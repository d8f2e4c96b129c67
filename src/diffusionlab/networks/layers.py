"""Building blocks shared by the DDPM++/NCSN++ and ADM U-Nets.

The structure follows EDM's unified U-Net block (Karras et al. 2022, Appendix F.2), which
reproduces DDPM++/NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021). Layers take their
initialisation as ``init_mode`` / ``init_weight`` / ``init_bias`` so each network can use the
scheme of its paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusionlab.diffusion.batched_rng import active_generator, use_generator
from diffusionlab.diffusion.seeds import DROPOUT_STREAM, LABEL_DROPOUT_STREAM


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Draw an initial tensor: xavier/kaiming, uniform/normal (EDM's conventions)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer with paper-specific initialisation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        kw = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **kw) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **kw) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def resample_kernel(taps: Sequence[float]) -> Tensor:
    """Separable 2-D FIR kernel ``[1, 1, k, k]`` normalised to unit DC gain."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """Convolution with optional FIR up/downsampling (EDM's Conv2d).

    ``kernel=0`` gives a pure resampling layer without weights. ``fused_resample`` merges the
    filter and the convolution as NCSN++'s residual encoder path does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        kw = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        self.weight = (
            nn.Parameter(
                weight_init([out_channels, in_channels, kernel, kernel], **kw) * init_weight
            )
            if kernel
            else None
        )
        self.bias = (
            nn.Parameter(weight_init([out_channels], **kw) * init_bias) if kernel and bias else None
        )
        self.register_buffer(
            "resample_filter", resample_kernel(resample_filter) if up or down else None
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            fu = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(
                x, fu, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0)
            )
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            fd = f.tile([self.out_channels, 1, 1, 1])
            x = F.conv2d(x, fd, groups=self.out_channels, stride=2)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.up:
            fu = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, fu, groups=self.in_channels, stride=2, padding=f_pad)
        if self.down:
            fd = f.tile([self.in_channels, 1, 1, 1])
            x = F.conv2d(x, fd, groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, b, padding=w_pad)
        return x


class GroupNorm(nn.GroupNorm):
    """Group normalisation with at most 32 groups and at least 4 channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(min(num_groups, num_channels // 4), num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        # float16 input, float32 weights (NVlabs use_fp16 models on CUDA): as EDM's GroupNorm
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, w, b, self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding of DDPM/Transformer (Vaswani et al. 2017, sec. 3.5)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.float(), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level (NCSN++, Song et al. 2021; Tancik et al. 2020)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x.float(), 2 * math.pi * self.freqs.float())
        return torch.cat([x.cos(), x.sin()], dim=1)


def attention_2d(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention over the pixels of ``qkv [B, 3C, H, W]`` -> ``[B, C, H, W]``.

    Channels are laid out as ``(head, channel, q/k/v)`` (EDM's layout); computed with
    ``scaled_dot_product_attention`` at scale ``1/sqrt(C/heads)``.
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(b, num_heads, c // num_heads, 3, h * w).unbind(3)
    out = F.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
    )
    return out.transpose(-1, -2).reshape(b, c, h, w)


def condition_labels(
    class_labels: Tensor | None, x: Tensor, label_dim: int, p: float, training: bool
) -> Tensor:
    """Float one-hot labels for the batch ``x``; each dropped with probability ``p`` while training.

    ``None`` (unconditional) gives zeros, so the label layer stays in the graph (DDP). Dropping a
    label zeroes it, as classifier-free guidance trains (Ho & Salimans 2022). Inside a training
    step the coin of sample ``i`` is its own (``LABEL_DROPOUT_STREAM``), else the process RNG's.
    """
    if class_labels is None:
        return torch.zeros(x.shape[0], label_dim, device=x.device)
    labels = class_labels.float()
    if not training or p == 0:
        return labels
    gen = active_generator()
    if gen is None:
        keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    else:
        keep = gen.uniform((1,), LABEL_DROPOUT_STREAM).to(labels.device) >= p
    return labels * keep.to(labels.dtype)


class Dropout(nn.Dropout):
    """Inverted dropout whose mask, inside a training step (``use_generator``), comes from each
    sample's own stream ``DROPOUT_STREAM + stream`` of the batched generator, so the mask of a
    sample does not depend on the batch it is in; from the process RNG otherwise. ``stream`` is
    the layer's index in its network (:func:`number_dropout_layers`)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__(p)
        self.stream = 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        gen = active_generator()
        if gen is None:
            return F.dropout(x, self.p, training=True)
        return gen.dropout(x, self.p, DROPOUT_STREAM + self.stream)


def number_dropout_layers(net: nn.Module) -> int:
    """Give every :class:`Dropout` of ``net`` its own stream (module order); returns the count."""
    layers = [m for m in net.modules() if isinstance(m, Dropout)]
    for i, m in enumerate(layers):
        m.stream = i
    return len(layers)


def run_block(block: nn.Module, checkpointing: bool, *args: Tensor) -> Tensor:
    """``block(*args)``; with ``checkpointing`` (and autograd on) its activations are recomputed
    in the backward pass instead of stored (non-reentrant; the RNG state and the step's batched
    generator are replayed, so dropout masks and gradients are unchanged)."""
    if checkpointing and torch.is_grad_enabled():
        gen = active_generator()
        return checkpoint(
            block,
            *args,
            use_reentrant=False,
            context_fn=lambda: (use_generator(gen), use_generator(gen)),
        )
    return block(*args)


def check_resolution(img_resolution: int, levels: int) -> None:
    """Raise one ValueError when the U-Net cannot halve ``img_resolution`` ``levels - 1`` times."""
    factor = 2 ** (levels - 1)
    if img_resolution < factor or img_resolution % factor:
        raise ValueError(
            f"img_resolution={img_resolution} must be a positive multiple of {factor} "
            f"(2^(len(channel_mult)-1)) for a U-Net with {levels} levels"
        )


class UNetBlock(nn.Module):
    """Residual U-Net block with optional up/downsampling and self-attention (EDM Fig. 19).

    The union of the DDPM++/NCSN++ and ADM blocks: ``adaptive_scale`` selects ADM's
    scale-and-shift conditioning (AdaGN) over DDPM++'s additive bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ) -> None:
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = (
            0
            if not attention
            else num_heads
            if num_heads is not None
            else out_channels // channels_per_head
        )
        self.dropout = dropout
        self.drop = Dropout(dropout)
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **init,
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn or init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x).to(x.dtype), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(self.drop(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = attention_2d(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a.to(x.dtype)) + x) * self.skip_scale
        return x
