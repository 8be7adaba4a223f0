"""Step 3, first half: target-guided decoding (PerSAM).

The similarity map becomes an attention bias for the decoder's
token-to-image cross-attention (target-guided attention), and the target
embedding is injected into the decoder tokens (target-semantic prompting);
see sam/transformer.py for how the decoder applies both.
"""

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sam.predictor import ImageEmbedding, Prediction, SamPredictor


def attention_similarity(
    similarity: torch.Tensor,
    input_size: Tuple[int, int],
    grid_size: int = 64,
    img_size: int = 1024,
) -> torch.Tensor:
    """H x W similarity map -> sigmoid of its z-score at every grid cell centre, flattened (grid * grid).

    The z-scored map is sampled (bilinear) at the centre of each cell of the
    decoder's grid, so the bias stays aligned with the image tokens also for
    non-square images; cells over the padding get the map's lowest value.
    On square images this equals the reference's direct resize to the grid.
    """
    height, width = similarity.shape
    z = _z_score(similarity)
    cell = img_size / grid_size
    centres = (torch.arange(grid_size, dtype=torch.float32, device=z.device) + 0.5) * cell  # input-frame pixels
    xs = centres * (width / input_size[1])  # original pixels
    ys = centres * (height / input_size[0])
    grid = torch.stack(torch.meshgrid(2 * xs / width - 1, 2 * ys / height - 1, indexing="xy"), dim=-1)
    sampled = F.grid_sample(z[None, None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[0, 0]
    inside = (ys[:, None] < height) & (xs[None, :] < width)
    sampled = torch.where(inside, sampled, z.min())
    return torch.sigmoid(sampled).flatten()


def _z_score(similarity: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std of the map; all zeros (no guidance) where that is undefined: a constant
    map, or a one-pixel image (whose std is NaN, with a torch warning)."""
    if similarity.numel() < 2:
        return torch.zeros_like(similarity)
    std = similarity.std()
    centred = similarity - similarity.mean()
    return torch.where(std > 0, centred / std, torch.zeros_like(centred))  # no host sync


def guided_prediction(
    predictor: SamPredictor,
    points: np.ndarray,
    labels: np.ndarray,
    attention: torch.Tensor,
    embedding: torch.Tensor,
    full_size: bool = True,
) -> Prediction:
    """The first PerSAM prediction: location prior points, guidance on, single mask (mask token 0).

    full_size=False: the low-res logits only (see SamPredictor.predict)."""
    return predictor.predict(
        point_coords=points,
        point_labels=labels,
        multimask_output=False,
        attention_similarity=attention,
        target_embedding=embedding,
        full_size=full_size,
    )


def guided_predictions(
    predictor: SamPredictor,
    images: Sequence[ImageEmbedding],
    points: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    attentions: Sequence[torch.Tensor],
    embedding: torch.Tensor,
) -> Prediction:
    """`guided_prediction` (full_size=False) for several encoded images in one decoder call, image
    i with its own points, labels and attention: low-res logits B x 1 x 256 x 256, iou B x 1."""
    return predictor.predict_each(
        images,
        np.stack(points),
        np.stack(labels),
        multimask_output=False,
        attention_similarity=torch.stack([a.reshape(-1) for a in attentions]),
        target_embedding=embedding,
    )
