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
    cells = cells / cell_norms(cells).clamp_min(1e-12)
    return torch.einsum("c,chw->hw", target_vector.to(cells.dtype), cells)


def cell_norms(cells: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each cell of C x h x w features over its channels: 1 x h x w, the very
    values of `cells.norm(dim=0, keepdim=True)` (the reference code's normalisation).

    For fp32 features on a CPU that kernel is a generic reduction, several times slower than
    the arithmetic: each cell's squares are added one channel after the other, then a
    correctly rounded square root is taken. The same sums in the same order are made here a
    whole channel at a time (numpy, whose square root is correctly rounded, unlike torch's
    vectorised one). tests/method/test_persam_steps.py checks the two are equal bit for bit.
    """
    if cells.device.type != "cpu" or cells.dtype != torch.float32 or cells.requires_grad or cells.shape[0] < 1:
        return cells.norm(dim=0, keepdim=True)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN pass through silently, as in torch
        squares = np.square(cells.detach().reshape(cells.shape[0], -1).numpy())
        total = squares[0].copy()
        for channel in squares[1:]:
            np.add(total, channel, out=total)
        return torch.from_numpy(np.sqrt(total).reshape(1, *cells.shape[1:]))


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


def _top_indices(similarity: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat indices of the k largest (or smallest) values of an H x W map, as `topk` gives them.

    For k = 1 `topk` over at least 64 values keeps the first of equal extremes (a heap
    selection with a strict comparison); the first extreme in row-major order is found here
    from the row extremes, several times quicker. Ties are common: the map is upscaled, so
    an extreme at a border cell is repeated over several pixels. A NaN, a smaller map or
    another k go to `topk` itself. tests/method/test_persam_steps.py checks the two agree.
    """
    flat = similarity.flatten()
    if k != 1 or similarity.dim() != 2 or similarity.numel() < 64:
        return flat.topk(k, largest=largest).indices if k > 0 else flat.new_zeros(0, dtype=torch.long)
    rows = similarity.amax(dim=1) if largest else similarity.amin(dim=1)
    row = int(rows.argmax() if largest else rows.argmin())  # the first row holding the extreme
    if torch.isnan(rows[row]):
        return flat.topk(1, largest=largest).indices
    values = similarity[row]
    column = int(values.argmax() if largest else values.argmin())  # its first column
    return torch.tensor([row * similarity.shape[1] + column], device=flat.device)


def select_points(similarity: torch.Tensor, k_positive: int = 1, k_negative: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Location prior on an H x W similarity map.

    Returns points N x 2 as (x, y) and labels N: the `k_positive` most similar
    pixels (label 1) followed by the `k_negative` least similar (label 0).
    """
    positives = _top_indices(similarity, k_positive, largest=True)
    negatives = _top_indices(similarity, k_negative, largest=False)
    width = similarity.shape[1]
    points = np.concatenate([_pixels_to_points(positives, width), _pixels_to_points(negatives, width)])
    labels = np.concatenate([np.ones(k_positive, np.int64), np.zeros(k_negative, np.int64)])
    return points, labels
