"""DDPM++ and NCSN++ U-Nets (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

Written after EDM's re-implementation (Karras et al. 2022, Appendix F.2, "SongUNet"), whose
CIFAR-10 configurations are the ``unet_ddpmpp`` / ``unet_ncsnpp`` presets.
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
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_resolution,
    condition_labels,
    run_block,
)


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``) or NCSN++ (``'fourier'``, residual encoder).

    ``F(x, c_noise, class_labels=None, augment_labels=None, context=None, context_mask=None,
    cond_vector=None, cond_image=None) -> [B, out_channels, H, W]``; the condition inputs of
    ``networks/context.py`` exist when ``context_dim`` (cross-attention after the blocks at
    ``cross_attn_resolutions``), ``vector_dim`` or ``cond_channels`` is set.
    Initialisation as in Song et al.: xavier-uniform, near-zero (1e-5) last convs, attention
    qkv scaled by sqrt(0.2). ``checkpointing=True`` recomputes each block's activations in the
    backward pass (less memory, about a third more compute).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        label_dropout: float = 0.0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        checkpointing: bool = False,
        context_dim: int = 0,
        vector_dim: int = 0,
        cond_channels: int = 0,
        cross_attn_resolutions: Sequence[int] = (),
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type={embedding_type!r}; use 'positional' or 'fourier'")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type={encoder_type!r}; use standard, skip or residual")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type={decoder_type!r}; use standard or skip")
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.checkpointing = checkpointing
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.cond_channels = cond_channels
        resample_filter = list(resample_filter)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping network: noise level (+ label, augmentation) -> embedding.
        self.map_noise = (
            PositionalEmbedding(noise_channels, endpoint=True)
            if embedding_type == "positional"
            else FourierEmbedding(noise_channels)
        )
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (
            Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        )
        self.map_vector = (
            Linear(vector_dim, noise_channels, bias=False, **init) if vector_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels + cond_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder.
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
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attn, **block_kwargs
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

        # Cross-attention to the context after the blocks at cross_attn_resolutions.
        names = cross_attention_names(
            list(self.enc), list(self.dec), list(cross_attn_resolutions), context_dim, "SongUNet"
        )
        self.xattn = nn.ModuleDict(
            {
                name: CrossAttention2d(
                    self._block(name).out_channels, context_dim, 1, 1e-6, init_attn, init_zero
                )
                for name in names
            }
        )

    def _block(self, name: str) -> nn.Module:
        """The block of a cross-attention name ``enc_<block>`` / ``dec_<block>``."""
        part, block = name.split("_", 1)
        return (self.enc if part == "enc" else self.dec)[block]

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
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # sin first, as Song
        if self.map_label is not None:
            labels = condition_labels(
                class_labels, x, self.label_dim, self.label_dropout, self.training
            )
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.float())
        if self.map_vector is not None and cond_vector is not None:
            emb = emb + self.map_vector(cond_vector.float())
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        x = concat_image(x, cond_image, self.cond_channels)
        ctx = context_or_empty(context, context_mask, x, self.context_dim) if self.xattn else ()

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                is_block = isinstance(block, UNetBlock)
                x = run_block(block, self.checkpointing, x, emb) if is_block else block(x)
                if f"enc_{name}" in self.xattn:
                    x = run_block(self.xattn[f"enc_{name}"], self.checkpointing, x, *ctx)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = run_block(block, self.checkpointing, x, emb)
                if f"dec_{name}" in self.xattn:
                    x = run_block(self.xattn[f"dec_{name}"], self.checkpointing, x, *ctx)
        return aux
