"""Hiera, SAM 2's hierarchical image trunk: four stages of transformer blocks at strides 4, 8, 16, 32.

Each stage starts with a block that pools its queries 2 x 2 (q-pooling), halving the grid and
doubling the channels and heads; most blocks attend within windows, a few attend globally. The
position embedding is SAM 2.1's windowed one: a small background embedding interpolated to the
grid plus one window-sized embedding tiled over it. Module and parameter names are those of Meta's
checkpoints (``image_encoder.trunk.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP

__all__ = ["HieraConfig", "Hiera", "HieraBlock", "MultiScaleAttention"]


@dataclass(frozen=True)
class HieraConfig:
    """The shape of a Hiera trunk (defaults are Meta's; each SAM 2.1 size overrides some)."""

    embed_dim: int = 96
    num_heads: int = 1
    stages: Tuple[int, ...] = (2, 3, 16, 3)  # blocks per stage
    global_attention_blocks: Tuple[int, ...] = (12, 16, 20)
    window_sizes: Tuple[int, ...] = (8, 4, 14, 7)  # per stage, for the windowed blocks
    pos_embed_background_size: Tuple[int, int] = (14, 14)
    q_pool_stages: int = 3  # how many stage changes pool the queries
    q_stride: int = 2
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def stage_ends(self) -> List[int]:
        """Index of the last block of each stage."""
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def stage_channels(self) -> List[int]:
        """Channels of each stage's output, highest resolution first."""
        return [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]


class BlockLayout(NamedTuple):
    dim: int
    dim_out: int
    num_heads: int
    window_size: int  # 0: global attention
    q_stride: Optional[int]


def block_layouts(config: HieraConfig) -> List[BlockLayout]:
    """Per block: its input / output widths, heads, window and query pooling.

    The first block of a stage changes the width and pools its queries, and still attends within
    the previous stage's window size (its windows shrink by the pooling).
    """
    if len(config.stages) != len(config.window_sizes):
        raise ValueError(f"Hiera: {len(config.stages)} stages but {len(config.window_sizes)} window sizes")
    stage_ends = config.stage_ends
    q_pool_blocks = [end + 1 for end in stage_ends[:-1]][: config.q_pool_stages]
    layouts, dim, heads, stage = [], config.embed_dim, config.num_heads, 0
    for index in range(sum(config.stages)):
        window = 0 if index in config.global_attention_blocks else config.window_sizes[stage]
        dim_out = dim
        if index - 1 in stage_ends:
            dim_out = int(dim * config.dim_mul)
            heads = int(heads * config.head_mul)
            stage += 1
        q_stride = config.q_stride if index in q_pool_blocks else None
        layouts.append(BlockLayout(dim, dim_out, heads, window, q_stride))
        dim = dim_out
    return layouts


def _pool_grid(x: torch.Tensor, stride: Optional[int]) -> torch.Tensor:
    """Max-pool a (B, H, W, C) grid by `stride` (none: unchanged) -> (B, H // stride, W // stride, C)."""
    if not stride:
        return x
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


def _to_windows(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> windows (B * n, window, window, C) (zero-padded grid) and the padded (Hp, Wp)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (window - height % window) % window, (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (padded_h, padded_w)


def _from_windows(windows: torch.Tensor, window: int, padded: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """The inverse of _to_windows: (B * n, window, window, C) -> (B, H, W, C) cropped to `size`."""
    padded_h, padded_w = padded
    batch = windows.shape[0] // (padded_h * padded_w // window // window)
    x = windows.reshape(batch, padded_h // window, padded_w // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    if padded_h > size[0] or padded_w > size[1]:
        x = x[:, : size[0], : size[1], :]
    return x


class MultiScaleAttention(nn.Module):
    """Self-attention over a (B, H, W, dim) grid -> (B, H', W', dim_out), queries pooled by q_stride."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = torch.unbind(qkv, 2)  # each (B, H*W, heads, head_dim)
        if self.q_stride:
            q = _pool_grid(q.reshape(batch, height, width, -1), self.q_stride)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


class HieraBlock(nn.Module):
    """One Hiera block: (B, H, W, dim) -> (B, H', W', dim_out), windowed or global attention then an MLP."""

    def __init__(self, layout: BlockLayout, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.dim_out = layout.dim, layout.dim_out
        self.window_size = layout.window_size
        self.q_stride = layout.q_stride
        self.norm1 = nn.LayerNorm(layout.dim, eps=1e-6)
        self.attn = MultiScaleAttention(layout.dim, layout.dim_out, layout.num_heads, layout.q_stride)
        self.norm2 = nn.LayerNorm(layout.dim_out, eps=1e-6)
        self.mlp = MLP(layout.dim_out, int(layout.dim_out * mlp_ratio), layout.dim_out, num_layers=2, activation=nn.GELU)
        if layout.dim != layout.dim_out:
            self.proj = nn.Linear(layout.dim, layout.dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool_grid(self.proj(x), self.q_stride)
        window = self.window_size
        if window > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = _to_windows(x, window)
        x = self.attn(x)
        if self.q_stride:  # the windows (and the grid) shrank with the queries
            window = self.window_size // self.q_stride
            size = (shortcut.shape[1], shortcut.shape[2])
            padded = tuple(side + (window - side % window) % window for side in size) if window else size
        if self.window_size > 0:
            x = _from_windows(x, window, padded, size)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """7 x 7 convolution at stride 4: image (B, 3, H, W) -> tokens (B, H/4, W/4, embed_dim)."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """The trunk: image (B, 3, S, S) -> one (B, C_i, S / 4 / 2^i, S / 4 / 2^i) map per stage i, stride 4 first."""

    def __init__(self, config: HieraConfig) -> None:
        super().__init__()
        self.config = config
        self.stage_ends = config.stage_ends
        self.patch_embed = PatchEmbed(config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, *config.pos_embed_background_size))
        first_window = config.window_sizes[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, config.embed_dim, first_window, first_window))
        self.blocks = nn.ModuleList(HieraBlock(layout, config.mlp_ratio) for layout in block_layouts(config))
        self.channel_list = list(reversed(config.stage_channels))  # lowest resolution first, as the neck reads it

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1, height, width, embed_dim): the background embedding resized bicubically plus the tiled window one."""
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window
        tiles = (height // window.shape[-2], width // window.shape[-1])
        return (background + window.tile(1, 1, *tiles)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
