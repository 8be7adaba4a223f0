"""SAM 2's image encoder: the Hiera trunk and an FPN neck that brings every stage to 256 channels.

The neck projects each stage with a 1 x 1 convolution and adds the nearest-upsampled coarser level
on the levels listed in ``top_down_levels`` (SAM 2.1: the two coarsest kept). Each level gets its
sine position encoding. ``scalp`` drops the coarsest levels (SAM 2.1 drops one), leaving three:
stride 4 and 8 (the decoder's high-resolution features) and stride 16 (the image embedding).
Key names are Meta's (``image_encoder.trunk.*``, ``image_encoder.neck.convs.N.conv.*``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import Hiera
from .position_encoding import SinePositionEncoding

__all__ = ["FpnNeck", "Sam2ImageEncoder"]


class FpnNeck(nn.Module):
    """Stage maps (stride 4 first, channels `backbone_channel_list` reversed) -> 256-channel levels and encodings."""

    def __init__(
        self,
        position_encoding: SinePositionEncoding,
        d_model: int,
        backbone_channel_list: Sequence[int],
        top_down_levels: Optional[Sequence[int]] = None,
        interpolation: str = "nearest",
    ) -> None:
        super().__init__()
        self.position_encoding = position_encoding
        self.backbone_channel_list = list(backbone_channel_list)  # lowest resolution first
        self.convs = nn.ModuleList()
        for channels in self.backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(channels, d_model, kernel_size=1))
            self.convs.append(lateral)
        levels = range(len(self.convs)) if top_down_levels is None else top_down_levels
        self.top_down_levels = list(levels)
        self.interpolation = interpolation

    def forward(self, stage_maps: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Stage maps, stride 4 first -> (features, position encodings), one (B, d_model, H_i, W_i) each."""
        if len(stage_maps) != len(self.convs):
            raise ValueError(f"FpnNeck: {len(stage_maps)} stage maps for {len(self.convs)} levels")
        last = len(self.convs) - 1
        features: List[torch.Tensor] = [None] * len(self.convs)  # type: ignore[list-item]
        encodings: List[torch.Tensor] = [None] * len(self.convs)  # type: ignore[list-item]
        coarser = None
        for level in range(last, -1, -1):  # coarse to fine
            lateral = self.convs[last - level](stage_maps[level])
            if level in self.top_down_levels and coarser is not None:
                upsampled = F.interpolate(
                    coarser.to(dtype=torch.float32),
                    scale_factor=2.0,
                    mode=self.interpolation,
                    align_corners=None if self.interpolation == "nearest" else False,
                    antialias=False,
                )
                coarser = lateral + upsampled
            else:
                coarser = lateral
            features[level] = coarser
            encodings[level] = self.position_encoding(coarser).to(coarser.dtype)
        return features, encodings


class Sam2ImageEncoder(nn.Module):
    """Normalised image (B, 3, S, S) -> dict with

    * ``backbone_fpn``: the kept levels, stride 4 first, each (B, 256, S / stride, S / stride);
    * ``vision_pos_enc``: their sine position encodings, same shapes;
    * ``vision_features``: the coarsest kept level (the image embedding, stride 16 for SAM 2.1).
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"Sam2ImageEncoder: trunk channels {trunk.channel_list} do not match the neck's {neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, image: torch.Tensor) -> Dict[str, object]:
        features, encodings = self.neck(self.trunk(image))
        if self.scalp > 0:
            features, encodings = features[: -self.scalp], encodings[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": encodings, "backbone_fpn": features}
