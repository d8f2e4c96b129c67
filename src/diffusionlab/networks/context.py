"""The condition inputs every image network shares besides class labels (docs/conditioning.md):

- ``context [B, L, context_dim]`` with ``context_mask [B, L]`` (True: a real token): a sequence of
  text-token embeddings that the feature maps attend to through cross-attention layers at chosen
  resolutions (Rombach et al. 2022, sec. 3.3; Saharia et al. 2022 for the frozen T5 encoder);
- ``cond_vector [B, vector_dim]``: a pooled embedding (CLIP's pooled text output, a noise-
  augmentation level) added to the noise embedding, as SDXL's "vector" conditioning;
- ``cond_image [B, cond_channels, h, w]``: an image resized to the network's input and
  concatenated to it (SR3, Saharia et al. 2021; cascaded diffusion, Ho et al. 2021).

``None`` for any of them is the unconditional input: an empty context (every cross-attention
layer also attends to a learned null token, so an all-masked sequence is well defined), a zero
vector, a zero image. Condition dropout for classifier-free guidance produces exactly these.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.networks.layers import Conv2d, GroupNorm, Linear


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image`` resized to ``size``: bicubic up (SR3's conditioning input), area down."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.shape[-2] < size[0]:
        return F.interpolate(image, size=size, mode="bicubic", align_corners=False)
    return F.interpolate(image, size=size, mode="area")


def concat_image(x: Tensor, cond_image: Tensor | None, cond_channels: int) -> Tensor:
    """``x`` with the conditioning image (resized to ``x``) appended as ``cond_channels`` more
    channels; zeros when ``cond_image`` is None (the unconditional input)."""
    if not cond_channels:
        return x
    if cond_image is None:
        img = x.new_zeros(x.shape[0], cond_channels, *x.shape[2:])
    else:
        if cond_image.shape[1] != cond_channels:
            raise ValueError(
                f"cond_image has {cond_image.shape[1]} channels, the network takes {cond_channels}"
            )
        img = resize_image(cond_image.to(x.dtype), tuple(x.shape[2:]))
    return torch.cat([x, img], dim=1)


def context_or_empty(
    context: Tensor | None, mask: Tensor | None, x: Tensor, context_dim: int
) -> tuple[Tensor, Tensor]:
    """``(context, mask)`` as the cross-attention layers take them: None is an empty sequence;
    a missing mask keeps every token."""
    b = x.shape[0]
    if context is None:
        return x.new_zeros(b, 0, context_dim), torch.zeros(b, 0, dtype=torch.bool, device=x.device)
    if context.ndim != 3 or context.shape[-1] != context_dim or context.shape[0] != b:
        raise ValueError(
            f"context must be [batch={b}, tokens, {context_dim}], got {tuple(context.shape)}"
        )
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    return context, mask.bool()


def with_null_token(context: Tensor, mask: Tensor, null: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend the learned null token (always attended) to every sequence."""
    b = context.shape[0]
    ctx = torch.cat([null.to(context.dtype).expand(b, 1, -1), context], dim=1)
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
    return ctx, keep


def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Multi-head attention of ``q [B, h, N, d]`` over ``k, v [B, h, L, d]`` where ``keep [B, L]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


class CrossAttention2d(nn.Module):
    """Pixels of ``x [B, C, H, W]`` attend to a token sequence (Rombach et al. 2022, eq. 3):
    ``x + proj(softmax(Q K^T / sqrt(d)) V)``, Q from the group-normalised pixels, K and V from
    the context with a learned null token prepended. Initialised as the U-Net's own attention
    (``init``), the output projection near zero (``init_zero``): the layer starts as identity."""

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int,
        eps: float = 1e-6,
        init: dict | None = None,
        init_zero: dict | None = None,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        init = init or {}
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, eps=eps)
        self.q = Conv2d(channels, channels, 1, **init)
        self.kv = Linear(context_dim, 2 * channels, **init)
        self.proj = Conv2d(channels, channels, 1, **(init_zero or dict(init_weight=0)))
        self.null = nn.Parameter(torch.zeros(context_dim))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ctx, keep = with_null_token(context.to(x.dtype), mask, self.null)
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x).to(x.dtype)).reshape(b, heads, d, h * w).transpose(-1, -2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, keep).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(a)


class TokenCrossAttention(nn.Module):
    """Image tokens ``x [B, N, C]`` attend to the context (PixArt-alpha's cross-attention in a
    DiT, Chen et al. 2023): ``x + proj(attn(LN(x), context))``, projection zero-initialised."""

    def __init__(self, hidden: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(context_dim, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.null = nn.Parameter(torch.zeros(context_dim))
        nn.init.xavier_uniform_(self.q.weight)
        nn.init.xavier_uniform_(self.kv.weight)
        nn.init.zeros_(self.q.bias)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, n, c = x.shape
        ctx, keep = with_null_token(context.to(x.dtype), mask, self.null)
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x).to(x.dtype)).reshape(b, n, heads, d).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, ctx.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, keep).transpose(1, 2).reshape(b, n, c)
        return x + self.proj(a)


def cross_attention_names(
    enc: list[str], dec: list[str], resolutions: list[int], context_dim: int, net: str
) -> list[str]:
    """The U-Net blocks (``'{res}x{res}_block{i}'``, ``_in0``, ``_in1`` of the encoder ``enc`` and
    decoder ``dec``) followed by a cross-attention layer, as ``enc_<name>`` / ``dec_<name>``:
    those at a resolution in ``resolutions``. A network with a context must attend somewhere."""
    if not context_dim:
        return []
    pattern = re.compile(r"^(\d+)x\d+_(block\d+|in[01])$")

    def pick(names: list[str], prefix: str) -> list[str]:
        return [
            f"{prefix}_{n}"
            for n in names
            if (m := pattern.match(n)) and int(m.group(1)) in set(resolutions)
        ]

    picked = pick(enc, "enc") + pick(dec, "dec")
    if not picked:
        levels = sorted({int(n.split("x")[0]) for n in enc}, reverse=True)
        raise ValueError(
            f"{net}: cross_attn_resolutions={list(resolutions)} match no level of the network "
            f"({levels}); choose among them"
        )
    return picked
