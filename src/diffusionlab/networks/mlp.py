"""Residual MLP for 2-D / low-dimensional data (toy distributions).

Pre-norm residual blocks conditioned on the noise embedding by scale-and-shift, the MLP analogue
of ADM's AdaGN block (Dhariwal & Nichol 2021, sec. 3); residual branches and the output layer
start at zero so the untrained network outputs 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusionlab.networks.layers import (
    Dropout,
    Linear,
    PositionalEmbedding,
    condition_labels,
)


class MLPBlock(nn.Module):
    """``x + W2 silu(W1 (LN(x) (1 + scale) + shift))`` with scale/shift from the embedding."""

    def __init__(self, hidden_dim: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        init = dict(init_mode="xavier_uniform")
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.affine = Linear(emb_dim, 2 * hidden_dim, **init)
        self.fc0 = Linear(hidden_dim, hidden_dim, **init)
        self.fc1 = Linear(hidden_dim, hidden_dim, init_mode="xavier_uniform", init_weight=0.0)
        self.dropout = dropout
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.affine(emb).to(x.dtype).chunk(2, dim=1)
        y = torch.addcmul(shift, self.norm(x).to(x.dtype), scale + 1)
        y = self.drop(F.silu(self.fc0(y)))
        return x + self.fc1(y)


class MLP(nn.Module):
    """Residual MLP ``F(x [B, in_dim], c_noise [B], class_labels, augment_labels, cond_vector)
    -> [B, in_dim]``; ``cond_vector [B, vector_dim]`` joins the noise embedding
    (networks/context.py)."""

    def __init__(
        self,
        in_dim: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        label_dropout: float = 0.0,
        hidden_dim: int = 256,
        num_blocks: int = 4,
        emb_dim: int = 128,
        dropout: float = 0.0,
        vector_dim: int = 0,
    ) -> None:
        super().__init__()
        init = dict(init_mode="xavier_uniform")
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.map_noise = PositionalEmbedding(emb_dim, endpoint=True)
        self.map_label = Linear(label_dim, emb_dim, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, emb_dim, bias=False, **init) if augment_dim else None
        self.vector_dim = vector_dim
        self.map_vector = Linear(vector_dim, emb_dim, bias=False, **init) if vector_dim else None
        self.map_layer0 = Linear(emb_dim, emb_dim, **init)
        self.map_layer1 = Linear(emb_dim, emb_dim, **init)
        self.proj_in = Linear(in_dim, hidden_dim, **init)
        self.blocks = nn.ModuleList(
            MLPBlock(hidden_dim, emb_dim, dropout) for _ in range(num_blocks)
        )
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = Linear(hidden_dim, in_dim, init_mode="xavier_uniform", init_weight=0.0)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        cond_vector: Tensor | None = None,
    ) -> Tensor:
        emb = self.map_noise(c_noise)
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
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(F.silu(self.norm_out(h)).to(h.dtype))
