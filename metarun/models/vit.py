"""ViT-S/16 (Dosovitskiy et al. 2021) under the DINO release's parameter names (Caron et al. 2021).

The layout of DINO's ``vision_transformer.py`` with ``vit_small(patch_size=16)``: 16x16 patches
embedded by a strided convolution (``patch_embed.proj``) into 384 dimensions, a class token
(``cls_token``) and learned position embeddings (``pos_embed``, ``[1, 1 + 14 * 14, 384]`` for a
224-pixel image), twelve pre-norm blocks (``blocks.N.norm1``, ``attn.qkv`` with bias, 6 heads,
``attn.proj``, ``norm2``, ``mlp.fc1`` 384 -> 1536, GELU, ``mlp.fc2``), a final ``norm``, and the
class token as the feature (384-d). This is the backbone of P>M>F (Hu et al. 2022), whose DINO
ViT + ProtoNet is the strongest simple few-shot pipeline published.

Any image size that is a multiple of 16 works: the 14x14 grid of position embeddings is resized
bicubically to the image's grid on every forward pass (DINO's ``interpolate_pos_encoding``, with
the target size given exactly rather than as a scale factor), and the parameter keeps its published
shape, so the published file and checkpoints load at every size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarun.models.pretrained import PretrainedBackbone

PATCH = 16
#: the grid the position embeddings are stored for: 224-pixel images, as published
GRID = 224 // PATCH


def resize_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch position embeddings ``[1, g * g, d]`` of a ``g x g`` grid -> ``[1, grid * grid, d]``, bicubically."""
    g = math.isqrt(pos.shape[1])
    if g == grid:
        return pos
    square = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [n, patches, dim]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d_head)) v, DINO's attention in one fused kernel
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTS16(PretrainedBackbone):
    """``[n, C, h, w]`` images -> ``[n, 384]``, the normalised class token."""

    arch = "vit_s16"
    head_prefixes = ("head.",)  # DINO's backbone files have none; a supervised ViT's classifier
    size_multiple = PATCH
    dim, depth, heads = 384, 12, 6

    def build(self) -> None:
        self.patch_embed = PatchEmbed(self.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, self.dim))
        self.blocks = nn.ModuleList(Block(self.dim, self.heads) for _ in range(self.depth))
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.out_features = self.dim
        # DINO's initialisation, a normal of std 0.02 for the tokens and linear layers, truncated at +-2: 100
        # standard deviations, so plain normal_ draws the same distribution (trunc_normal_ took 4 s here)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embeddings(self, grid: int) -> torch.Tensor:
        """``[1, 1 + grid * grid, dim]``: the class token's, then the patches' resized to ``grid x grid``."""
        return torch.cat([self.pos_embed[:, :1], resize_grid(self.pos_embed[:, 1:], grid)], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[-1] // PATCH
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embeddings(grid)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]
