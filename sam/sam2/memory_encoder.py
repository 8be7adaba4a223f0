"""SAM 2.1's memory encoder: a frame's features and its predicted mask fused into one memory entry.

The mask (at the model's input size, 1024 x 1024) is brought to the feature grid (64 x 64) by four
strided convolutions (each halving the side and multiplying the channels by four), added to a projection
of the frame's features, mixed by two ConvNeXt blocks and projected to the memory's 64 channels. The
entry's position encoding is the fixed sine encoding of the grid. Parameter names follow Meta's
checkpoints (``memory_encoder.mask_downsampler.encoder.0.weight`` ...).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from sam.common import LayerNorm2d
from sam.sam2.position_encoding import SinePositionEncoding

__all__ = ["ConvNeXtBlock", "MaskDownSampler", "MemoryEncoder", "MemoryFuser"]


class MaskDownSampler(nn.Module):
    """Mask (B, 1, H, W) -> (B, embed_dim, H / total_stride, W / total_stride).

    ``encoder`` holds [conv, LayerNorm2d, GELU] per halving, then a 1 x 1 conv to embed_dim (Meta's
    index order, so ``encoder.0`` is the first conv and ``encoder.12`` the last for SAM 2.1).
    """

    def __init__(self, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 total_stride: int = 16) -> None:
        super().__init__()
        num_steps = 0
        while stride ** num_steps < total_stride:
            num_steps += 1
        if stride ** num_steps != total_stride:
            raise ValueError(f"MaskDownSampler: total stride {total_stride} is not a power of {stride}")
        layers = []
        channels = 1
        for _ in range(num_steps):
            out_channels = channels * stride * stride
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding),
                LayerNorm2d(out_channels),
                nn.GELU(),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(mask)


class ConvNeXtBlock(nn.Module):
    """Depth-wise 7 x 7 conv, LayerNorm, pointwise MLP (x4, GELU), layer scale, residual: (B, C, H, W)."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # (B, H, W, C)
        mixed = self.gamma * self.pwconv2(self.act(self.pwconv1(mixed)))
        return x + mixed.permute(0, 3, 1, 2)


class MemoryFuser(nn.Module):
    """A stack of ConvNeXt blocks (Meta's ``fuser.layers.N``), (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConvNeXtBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Frame features + mask -> memory features and their position encoding (SAM 2.1: 256 -> 64)."""

    def __init__(self, in_dim: int = 256, out_dim: int = 64, num_fuser_layers: int = 2) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(embed_dim=in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = MemoryFuser(in_dim, num_fuser_layers)
        self.position_encoding = SinePositionEncoding(out_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        self.out_dim = out_dim

    def forward(self, pixel_features: torch.Tensor, mask_for_memory: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """pixel_features (B, in_dim, h, w); mask_for_memory (B, 1, 16 h, 16 w), the mask as the tracker
        prepared it (a scaled and shifted probability, no sigmoid applied here).

        Returns (features (B, out_dim, h, w), position encoding (B, out_dim, h, w)).
        """
        mask_features = self.mask_downsampler(mask_for_memory)
        fused = self.fuser(self.pix_feat_proj(pixel_features.to(mask_features.device)) + mask_features)
        features = self.out_proj(fused)
        return features, self.position_encoding(features).to(features.dtype)
