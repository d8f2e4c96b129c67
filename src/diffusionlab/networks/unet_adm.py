"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis").

Written after EDM's re-implementation (Karras et al. 2022, Appendix F.2, "DhariwalUNet"), whose
ImageNet-64 configuration is the ``unet_adm`` preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.networks.context import (
    CrossAttention2d,
    concat_image,
    context_or_empty,
    cross_attention_names,
)
from diffusionlab.networks.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_resolution,
    condition_labels,
    run_block,
)


class DhariwalUNet(nn.Module):
    """ADM: AdaGN residual blocks, 64-channel attention heads, class embedding added to time.

    ``F(x, c_noise, class_labels=None, augment_labels=None, context=None, context_mask=None,
    cond_vector=None, cond_image=None) -> [B, out_channels, H, W]``; the condition inputs of
    ``networks/context.py`` exist when ``context_dim`` (cross-attention with 64-channel heads
    after the blocks at ``cross_attn_resolutions``), ``vector_dim`` or ``cond_channels`` is set.
    Initialisation as ADM: kaiming-uniform scaled by sqrt(1/3) (PyTorch's default), zero output
    convolutions of every residual branch and of the network. ``checkpointing=True``
    recomputes each block's activations in the backward pass (less memory, more compute).
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
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
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
        self.checkpointing = checkpointing
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.cond_channels = cond_channels
        emb_channels = model_channels * channel_mult_emb
        init = dict(
            init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3)
        )
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels,
            channels_per_head=64,
            dropout=dropout,
            init=init,
            init_zero=init_zero,
        )

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(
                label_dim,
                emb_channels,
                bias=False,
                init_mode="kaiming_normal",
                init_weight=math.sqrt(label_dim),
            )
            if label_dim
            else None
        )
        self.map_vector = (
            Linear(vector_dim, emb_channels, bias=False, init_mode="kaiming_normal")
            if vector_dim
            else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels + cond_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        names = cross_attention_names(
            list(self.enc),
            list(self.dec),
            list(cross_attn_resolutions),
            context_dim,
            "DhariwalUNet",
        )
        self.xattn = nn.ModuleDict()
        for name in names:
            part, block = name.split("_", 1)
            c = (self.enc if part == "enc" else self.dec)[block].out_channels
            heads = max(1, c // 64)
            self.xattn[name] = CrossAttention2d(c, context_dim, heads, 1e-5, init, init_zero)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cond_vector: Tensor | None = None,
        cond_image: Tensor | None = None,
    ) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.float())
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(
                condition_labels(class_labels, x, self.label_dim, self.label_dropout, self.training)
            )
        if self.map_vector is not None and cond_vector is not None:
            emb = emb + self.map_vector(cond_vector.float())
        emb = F.silu(emb)
        x = concat_image(x, cond_image, self.cond_channels)
        ctx = context_or_empty(context, context_mask, x, self.context_dim) if self.xattn else ()

        skips = []
        for name, block in self.enc.items():
            is_block = isinstance(block, UNetBlock)
            x = run_block(block, self.checkpointing, x, emb) if is_block else block(x)
            if f"enc_{name}" in self.xattn:
                x = run_block(self.xattn[f"enc_{name}"], self.checkpointing, x, *ctx)
            skips.append(x)
        for name, block in self.dec.items():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = run_block(block, self.checkpointing, x, emb)
            if f"dec_{name}" in self.xattn:
                x = run_block(self.xattn[f"dec_{name}"], self.checkpointing, x, *ctx)
        return self.out_conv(F.silu(self.out_norm(x)))
