"""Diffusion Transformer with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"); sizes S/B/L/XL of the paper's Table 1 through ``DIT_SIZES``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.networks.context import TokenCrossAttention, concat_image, context_or_empty
from diffusionlab.networks.layers import condition_labels, run_block

#: depth, hidden size, heads of DiT Table 1.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[grid*grid, dim]`` (MAE / DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    cols = coords.repeat(grid)  # column index of each token, row-major
    rows = coords.repeat_interleave(grid)

    def embed(pos: Tensor) -> Tensor:
        out = torch.outer(pos, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of the (possibly fractional) noise input."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class DiTBlock(nn.Module):
    """Pre-LN transformer block whose norms are modulated and gated by the condition (adaLN-Zero)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden, int(hidden * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden * mlp_ratio), hidden)
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)

    def attention(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(F.silu(c))[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = self.norm1(x).to(x.dtype) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attention(h)
        h = self.norm2(x).to(x.dtype) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    """DiT: patchify, transformer blocks conditioned on noise + class, adaLN-Zero final layer.

    ``F(x, c_noise, class_labels=None, augment_labels=None) -> [B, out_channels, H, W]``. The
    class table has a learned "null" row used when a sample's one-hot label is all zeros
    (unconditional / dropped label, as DiT's classifier-free guidance). ``DiT(..., size="XL",
    patch_size=2)`` is DiT-XL/2; the paper's counts use ``out_channels = 2 * in_channels``
    (learned sigma). ``checkpointing=True`` recomputes each transformer block's activations in
    the backward pass (less memory, more compute).

    Condition inputs (``networks/context.py``): with ``context_dim`` every transformer block is
    followed by cross-attention to the context (PixArt-alpha; the DiT works at one token
    resolution, so ``cross_attn_resolutions`` only needs to be non-empty, as for the U-Nets);
    ``cond_vector`` joins the noise embedding, ``cond_image`` is concatenated before patchifying.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        label_dropout: float = 0.0,
        size: str = "XL",
        patch_size: int = 2,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        frequency_embedding_size: int = 256,
        checkpointing: bool = False,
        context_dim: int = 0,
        vector_dim: int = 0,
        cond_channels: int = 0,
        cross_attn_resolutions: Sequence[int] = (),
    ) -> None:
        if size not in DIT_SIZES:
            raise ValueError(f"size={size!r}; use one of {sorted(DIT_SIZES)}")
        if img_resolution % patch_size:
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by patch_size={patch_size}"
            )
        super().__init__()
        d, h, nh = DIT_SIZES[size]
        depth, hidden_size, num_heads = depth or d, hidden_size or h, num_heads or nh
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 and by num_heads")
        self.img_resolution = img_resolution
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.frequency_embedding_size = frequency_embedding_size
        self.checkpointing = checkpointing
        self.grid = img_resolution // patch_size
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.cond_channels = cond_channels
        if context_dim and not cross_attn_resolutions:
            raise ValueError("DiT: context_dim > 0 needs a non-empty cross_attn_resolutions")

        self.x_embedder = nn.Conv2d(
            in_channels + cond_channels, hidden_size, patch_size, stride=patch_size
        )
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False
        )
        self.t_mlp0 = nn.Linear(frequency_embedding_size, hidden_size)
        self.t_mlp1 = nn.Linear(hidden_size, hidden_size)
        self.label_table = (
            nn.Parameter(torch.empty(label_dim + 1, hidden_size)) if label_dim else None
        )
        self.map_augment = nn.Linear(augment_dim, hidden_size, bias=False) if augment_dim else None
        self.map_vector = nn.Linear(vector_dim, hidden_size, bias=False) if vector_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.initialize_weights()
        # after the paper's initialisation: unconditional DiTs keep their exact weights
        self.xattn = nn.ModuleList(
            TokenCrossAttention(hidden_size, context_dim, num_heads)
            for _ in range(depth if context_dim else 0)
        )

    def initialize_weights(self) -> None:
        """DiT sec. 3.2 / reference code: xavier linears, N(0, 0.02) embeddings, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.label_table is not None:
            nn.init.normal_(self.label_table, std=0.02)
        nn.init.normal_(self.t_mlp0.weight, std=0.02)
        nn.init.normal_(self.t_mlp1.weight, std=0.02)
        for m in [*(b.adaLN_modulation for b in self.blocks), self.final_modulation]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

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
        b, _, hgt, wid = x.shape
        if hgt != self.img_resolution or wid != self.img_resolution:
            raise ValueError(
                f"input is {hgt}x{wid} but the DiT was built for img_resolution={self.img_resolution}"
            )
        x = concat_image(x, cond_image, self.cond_channels)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        t = timestep_embedding(c_noise, self.frequency_embedding_size)
        c = self.t_mlp1(F.silu(self.t_mlp0(t)))
        if self.label_table is not None:
            y = condition_labels(class_labels, x, self.label_dim, self.label_dropout, self.training)
            null = 1 - y.sum(dim=1, keepdim=True)  # weight of the null row: 1 when no label
            c = c + torch.cat([y, null], dim=1) @ self.label_table
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.float())
        if self.map_vector is not None and cond_vector is not None:
            c = c + self.map_vector(cond_vector.to(c.dtype))
        ctx = context_or_empty(context, context_mask, x, self.context_dim) if self.xattn else ()
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.checkpointing, x, c)
            if self.xattn:
                x = run_block(self.xattn[i], self.checkpointing, x, *ctx)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=2)
        x = self.final_linear(self.norm_final(x).to(x.dtype) * (1 + scale) + shift)
        p, g = self.patch_size, self.grid
        x = x.reshape(b, g, g, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.out_channels, g * p, g * p)
