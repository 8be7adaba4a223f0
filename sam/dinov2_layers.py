"""The building blocks of Meta's DINOv2 ViT: patch embedding, attention, feed-forward layers,
layer scale and the pre-norm transformer block.

Written for the toolkit (Meta's code is not a dependency); module and parameter names follow
Meta's so that the official ``dinov2_vit*14_pretrain.pth`` state dicts load with
``strict=True`` (``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``,
``blocks.N.mlp.fc1`` or, for ViT-g/14, ``blocks.N.mlp.w12`` / ``w3``).  Tokens are B x N x C
throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Meta builds every DINOv2 LayerNorm with this epsilon (not torch's default 1e-5).
LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping square patches: B x 3 x H x W -> B x (H/p * W/p) x C, row-major."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Global multi-head self-attention with one fused qkv projection: B x N x C -> B x N x C."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        # B x N x 3C -> 3 x B x heads x N x head_dim
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Two linear layers with GELU between (ViT-S/B/L): C -> hidden -> C."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0) -> int:
    """The hidden width Meta's fused SwiGLU uses: 2/3 of the MLP's, rounded up to a multiple of 8
    (4096 for ViT-g/14's 1536 channels)."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (ViT-g/14): one projection to 2 x hidden (gate, value), silu(gate) *
    value, then back to C.  Matches Meta's ``SwiGLUFFNFused`` without xFormers."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch: x * gamma."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, ffn: str = "mlp", mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio))
        else:
            raise ValueError(f"unknown feed-forward layer {ffn!r}; expected 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))
