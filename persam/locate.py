"""Step 2: where the target is in a new image.

Cosine similarity between the target vector and every cell of the image
features, brought to image size exactly like mask logits, then the location
prior: the most similar pixels as positive points, the least similar as
negative points.
"""

from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def similarity_grid(features: torch.Tensor, target_vector: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a unit target vector (C) with every cell of 1 x C x h x w features: h x w."""
    cells = features[0]
    cells = cells / cells.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.einsum("c,chw->hw", target_vector.to(cells.dtype), cells)


def similarity_map(grid_similarity: torch.Tensor, upscale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """h x w similarity -> H x W, as mask logits: x4 bilinear, then `upscale` (to the input frame, crop, to H x W).

    `upscale` is the predictor's `SamPredictor.upscale` for the image.
    """
    x = F.interpolate(grid_similarity[None, None], scale_factor=4, mode="bilinear", align_corners=False)
    return upscale(x)[0, 0]


def _pixels_to_points(flat_indices: torch.Tensor, width: int) -> np.ndarray:
    rows = flat_indices // width
    cols = flat_indices % width
    return torch.stack([cols, rows], dim=1).cpu().numpy().astype(np.float32)  # (x, y)


def select_points(similarity: torch.Tensor, k_positive: int = 1, k_negative: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Location prior on an H x W similarity map.

    Returns points N x 2 as (x, y) and labels N: the `k_positive` most similar
    pixels (label 1) followed by the `k_negative` least similar (label 0).
    """
    flat = similarity.flatten()
    positives = flat.topk(k_positive).indices
    negatives = flat.topk(k_negative, largest=False).indices if k_negative > 0 else positives[:0]
    width = similarity.shape[1]
    points = np.concatenate([_pixels_to_points(positives, width), _pixels_to_points(negatives, width)])
    labels = np.concatenate([np.ones(k_positive, np.int64), np.zeros(k_negative, np.int64)])
    return points, labels
