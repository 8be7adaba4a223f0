"""SAM 2's prompt encoder: SAM's, with box corners also accepted as labelled points.

Meta's SAM 2 keeps SAM's prompt encoder (same keys, same maths) and one addition: point labels 2 and
3 mark a box's top-left and bottom-right corners, which is how its video predictor passes boxes. So
this subclasses :class:`sam.prompt_encoder.PromptEncoder` and only widens the point labels.
Keys: ``sam_prompt_encoder.*`` as in Meta's checkpoints.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..prompt_encoder import PromptEncoder

__all__ = ["Sam2PromptEncoder"]


class Sam2PromptEncoder(PromptEncoder):
    """Points (labels -1 padding, 0 background, 1 foreground, 2 / 3 box corners), boxes and masks -> embeddings.

    ``forward(points, boxes, masks)`` gives sparse (B, N, 256) and dense (B, 256, S/16, S/16) embeddings.
    """

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int], input_image_size: Tuple[int, int],
                 mask_in_chans: int = 16) -> None:
        super().__init__(embed_dim, image_embedding_size, input_image_size, mask_in_chans)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (B, N, 2) as (x, y) in input-frame pixels, labels (B, N) -> (B, N (+1 with pad), C)."""
        encoded = super().embed_points(points, labels, pad)
        if pad:
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        encoded = encoded + (labels == 2).unsqueeze(-1) * self.point_embeddings[2].weight
        return encoded + (labels == 3).unsqueeze(-1) * self.point_embeddings[3].weight
