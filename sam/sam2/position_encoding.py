"""Fixed sine-cosine 2D position encoding of a feature grid (SAM 2's FPN neck and memory encoder).

It has no weights: each grid cell (row y, column x), counted from 1 and divided by the grid's side,
is scaled to [0, 2*pi] and encoded with sines and cosines of geometrically spaced frequencies, the
first half of the channels for y and the second half for x, exactly as Meta's
``PositionEmbeddingSine`` does (so features computed with it match the official model's).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["SinePositionEncoding"]


class SinePositionEncoding(nn.Module):
    """Sine 2D position encoding: ``forward(x)`` with x (B, *, H, W) gives (B, num_pos_feats, H, W).

    ``num_pos_feats`` is the number of output channels (half for rows, half for columns).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"SinePositionEncoding needs an even number of channels, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("SinePositionEncoding: a scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._grid_cache: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}

    def grid_encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The encoding of an (height, width) grid, (num_pos_feats, H, W) float32 (cached per size)."""
        key = (height, width, torch.device(device))
        cached = self._grid_cache.get(key)
        if cached is not None:
            return cached
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            rows = rows / (rows[-1:] + eps) * self.scale
            cols = cols / (cols[-1:] + eps) * self.scale
        per_axis = self.num_pos_feats // 2
        steps = torch.arange(per_axis, dtype=torch.float32, device=device)
        frequencies = self.temperature ** (2 * (steps // 2) / per_axis)
        row_code = _interleave_sin_cos(rows[:, None] / frequencies)  # (H, per_axis)
        col_code = _interleave_sin_cos(cols[:, None] / frequencies)  # (W, per_axis)
        encoding = torch.cat(
            (
                row_code.t()[:, :, None].expand(per_axis, height, width),
                col_code.t()[:, None, :].expand(per_axis, height, width),
            ),
            dim=0,
        ).contiguous()
        self._grid_cache[key] = encoding
        return encoding

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> encoding (B, num_pos_feats, H, W), float32 on x's device (a fresh tensor)."""
        encoding = self.grid_encoding(x.shape[-2], x.shape[-1], x.device)
        return encoding[None].repeat(x.shape[0], 1, 1, 1)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """angles (N, D) -> (N, D): sin of the even columns and cos of the odd ones, paired in order."""
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
