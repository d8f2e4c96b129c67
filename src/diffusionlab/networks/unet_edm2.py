"""EDM2 magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G, Fig. 21), with the learned log-variance head u(sigma)
of its uncertainty-weighted loss (eq. 21). Sizes XS/S/M/L/XL/XXL differ only in
``model_channels`` (128/192/256/320/384/448)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.networks.context import (
    attend,
    concat_image,
    context_or_empty,
    cross_attention_names,
    with_null_token,
)
from diffusionlab.networks.layers import (
    Dropout,
    check_resolution,
    condition_labels,
    resample_kernel,
    run_block,
)


def normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """Scale ``x`` to unit RMS over ``dim`` (all but the first by default), EDM2 eq. 66."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving weighted sum (EDM2 eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation (EDM2 eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: Tensor, taps: Sequence[float], mode: str) -> Tensor:
    """Depthwise FIR up/downsampling by 2 (``mode`` 'up', 'down' or 'keep')."""
    if mode == "keep":
        return x
    c = x.shape[1]
    f = resample_kernel(taps).to(x.device, x.dtype).tile([c, 1, 1, 1])
    pad = (len(taps) - 1) // 2
    if mode == "down":
        return F.conv2d(x, f, groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, f * 4, groups=c, stride=2, padding=pad)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features ``sqrt(2) cos(2 pi (f x + phi))`` (EDM2 eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution / linear layer with forced weight normalisation
    (EDM2 eqs. 47, 66): weights are renormalised in place at every training step."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.float()
        # not under a torch.func transform (sCM's JVP pass): it may not write captured weights,
        # and the normalised w below is the same either way
        if self.training and not torch._C._functorch.is_functorch_wrapped_tensor(x):
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 encoder ('enc') or decoder ('dec') block with optional attention (Fig. 21)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.drop = Dropout(dropout)
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        cin0 = out_channels if flavor == "enc" else in_channels
        self.conv_res0 = MPConv(cin0, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = (
            MPConv(in_channels, out_channels, kernel=[1, 1])
            if in_channels != out_channels
            else None
        )
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.drop(y)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # pixel norm per head
            y = F.scaled_dot_product_attention(
                q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
            )
            y = self.attn_proj(y.transpose(-1, -2).reshape(b, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class MPCrossAttention(nn.Module):
    """Magnitude-preserving cross-attention: pixels attend to the unit-RMS context tokens (a
    learned null token first), queries and keys pixel-normalised per head as EDM2's
    self-attention (Fig. 21), the result blended in by ``mp_sum(x, y, attn_balance)``."""

    def __init__(
        self, channels: int, context_dim: int, channels_per_head: int, attn_balance: float
    ) -> None:
        super().__init__()
        self.num_heads = max(1, channels // channels_per_head)
        self.attn_balance = attn_balance
        self.q = MPConv(channels, channels, [1, 1])
        self.kv = MPConv(context_dim, 2 * channels, [])
        self.proj = MPConv(channels, channels, [1, 1])
        self.null = nn.Parameter(torch.randn(context_dim))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ctx, keep = with_null_token(context.to(x.dtype), mask, self.null)
        ctx = normalize(ctx, dim=-1)
        heads = self.num_heads
        q = normalize(self.q(x).reshape(b, heads, -1, h * w), dim=2).transpose(-1, -2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        y = attend(q, normalize(k, dim=-1), v, keep)
        y = self.proj(y.transpose(-1, -2).reshape(b, c, h, w))
        return mp_sum(x, y, t=self.attn_balance)


class EDM2UNet(nn.Module):
    """EDM2 U-Net: ``F(x, c_noise, class_labels, augment_labels, return_logvar=False)``.

    With ``return_logvar=True`` it also returns the log-variance ``u(c_noise)`` ``[B, 1, 1, 1]``
    of EDM2's uncertainty weighting (eq. 21), from its own Fourier features and linear layer
    (``logvar_channels=0`` drops the head, e.g. for DDP runs that never use it).
    ``augment_labels`` (not in EDM2) enter the embedding through a bias-free MPConv, so zero
    labels and ``None`` agree. ``checkpointing=True`` recomputes each block's activations in
    the backward pass (less memory, more compute). Condition inputs (``networks/context.py``):
    ``context_dim`` adds :class:`MPCrossAttention` after the blocks at ``cross_attn_resolutions``,
    ``vector_dim`` an MPConv of the vector blended into the embedding like the label,
    ``cond_channels`` the resized image concatenated to the input.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        label_dropout: float = 0.0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        logvar_channels: int = 128,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        checkpointing: bool = False,
        context_dim: int = 0,
        vector_dim: int = 0,
        cond_channels: int = 0,
        cross_attn_resolutions: Sequence[int] = (),
    ) -> None:
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.checkpointing = checkpointing
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.cond_channels = cond_channels
        block_kwargs = dict(
            resample_filter=resample_filter,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb else max(cblock)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        self.emb_augment = MPConv(augment_dim, cemb, kernel=[]) if augment_dim else None
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels else None
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[]) if logvar_channels else None

        self.emb_vector = MPConv(vector_dim, cemb, kernel=[]) if vector_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels + cond_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(
                    cout, cout, cemb, flavor="dec", attention=True, **block_kwargs
                )
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs
                )
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs
                )
        self.out_conv = MPConv(cout, out_channels, kernel=[3, 3])
        names = cross_attention_names(
            list(self.enc), list(self.dec), list(cross_attn_resolutions), context_dim, "EDM2UNet"
        )
        self.xattn = nn.ModuleDict()
        for name in names:
            part, block = name.split("_", 1)
            c = (self.enc if part == "enc" else self.dec)[block].out_channels
            self.xattn[name] = MPCrossAttention(c, context_dim, channels_per_head, attn_balance)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        return_logvar: bool = False,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cond_vector: Tensor | None = None,
        cond_image: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            labels = condition_labels(
                class_labels, x, self.label_dim, self.label_dropout, self.training
            )
            emb = mp_sum(
                emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance
            )
        if self.emb_augment is not None and augment_labels is not None:
            emb = emb + self.emb_augment(augment_labels.float())
        if self.emb_vector is not None:  # None: the zero vector (what condition dropout trains)
            dim = self.emb_vector.weight.shape[1]
            vector = emb.new_zeros(emb.shape[0], dim) if cond_vector is None else cond_vector
            emb = mp_sum(emb, self.emb_vector(normalize(vector.float())), t=self.label_balance)
        emb = mp_silu(emb)

        x = concat_image(x, cond_image, self.cond_channels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        ctx = context_or_empty(context, context_mask, x, self.context_dim) if self.xattn else ()
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else run_block(block, self.checkpointing, x, emb)
            if f"enc_{name}" in self.xattn:
                x = run_block(self.xattn[f"enc_{name}"], self.checkpointing, x, *ctx)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = run_block(block, self.checkpointing, x, emb)
            if f"dec_{name}" in self.xattn:
                x = run_block(self.xattn[f"dec_{name}"], self.checkpointing, x, *ctx)
        out = self.out_conv(x, gain=self.out_gain)
        if not return_logvar:
            return out
        if self.logvar_linear is None:
            raise ValueError(
                "return_logvar=True needs a log-variance head; set logvar_channels > 0"
            )
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return out, logvar
