"""SAM's prompt encoder: points, boxes and low-resolution masks -> embeddings."""

from typing import Optional, Tuple, Type

import numpy as np
import torch
from torch import nn

from .common import LayerNorm2d


class PromptEncoder(nn.Module):
    """Sparse embeddings (points, box corners) and a dense embedding (mask or no-mask)."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: 1 x C x h x w (computed once, then cached)."""
        return self._dense_pe()[0]

    def get_dense_pe_tokens(self) -> torch.Tensor:
        """The same encoding as contiguous tokens, 1 x (h * w) x C (what the decoder adds to image tokens)."""
        return self._dense_pe()[1]

    def _dense_pe(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # It depends only on the random frequency matrix: cached until that changes (new values,
        # device or dtype), computed outside inference mode so that autograd code may use it too.
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        try:
            key = (matrix.device, matrix.dtype, matrix.data_ptr(), matrix._version, tuple(self.image_embedding_size))
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            return pe, pe.flatten(2).transpose(1, 2).contiguous()
        cached = self.__dict__.get("_dense_pe_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
                cached = (key, pe, pe.flatten(2).transpose(1, 2).contiguous())
            self.__dict__["_dense_pe_cache"] = cached
        return cached[1], cached[2]

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points: B x N x 2 (x, y in input-frame pixels), labels: B x N -> B x N(+1) x C.

        Labels: 1 foreground, 0 background, -1 padding ("not a point").
        """
        points = points + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        encoded = self.pe_layer.forward_with_coords(points, self.input_image_size)
        is_padding = (labels == -1).unsqueeze(-1)
        encoded = torch.where(is_padding, self.not_a_point_embed.weight, encoded)
        encoded = encoded + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        encoded = encoded + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight
        return encoded

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes: B x 4 (x0, y0, x1, y1 in input-frame pixels) -> B x 2 x C."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        encoded = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return encoded + corner_types

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: B x 1 x 4h x 4w logits -> B x C x h x w (channels last in memory).

        After the first stage (convolution, norm, activation: 4 channels, quickest as they
        are) the maps are made channels-last: the following convolutions keep that layout,
        which is the decoder's token layout (hw x C) and, for the last 1 x 1 convolution to C
        channels, over ten times quicker on a CPU.
        """
        conv, norm, act, *rest = self.mask_downscaling
        x = act(norm(conv(masks))).contiguous(memory_format=torch.channels_last)
        for layer in rest:
            x = layer(x)
        return x

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse B x N x C and dense B x C x h x w embeddings."""
        batch = _batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            coords, labels = points
            sparse.append(self.embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse_embeddings, dense_embeddings


def _batch_size(
    points: Optional[Tuple[torch.Tensor, torch.Tensor]],
    boxes: Optional[torch.Tensor],
    masks: Optional[torch.Tensor],
) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if masks is not None:
        return masks.shape[0]
    return 1


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Fourier features)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], ... x 2 -> ... x 2 * num_pos_feats."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an h x w grid: C x h x w."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2 (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (x, y), B x N x 2, in an image of size (H, W) -> B x N x C."""
        normalised = coords.to(torch.float32).clone()
        normalised[..., 0] = normalised[..., 0] / image_size[1]
        normalised[..., 1] = normalised[..., 1] / image_size[0]
        return self._encode(normalised)
