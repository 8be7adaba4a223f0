"""Several objects of one concept in one image (PERSAM_METHOD.md, "Multiple objects").

The reference blacks out each found object and re-encodes the whole image.
Here the image is encoded once: after each found object its pixels (and the
neighbourhood of the positive point that found it) are suppressed in the
similarity map, and the next peak is taken.
"""

from typing import List, Optional

import numpy as np
import torch

from sam.predictor import SamPredictor

from persam.method.pipeline import Concept, Segmentation, locate, segment_at


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two H x W bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _suppress_point(similarity: torch.Tensor, point: np.ndarray, radius: float, floor: torch.Tensor) -> None:
    """Set the pixels within `radius` of point (x, y) to `floor`, in place."""
    height, width = similarity.shape
    x, y = float(point[0]), float(point[1])
    ys = torch.arange(height, dtype=torch.float32, device=similarity.device)[:, None]
    xs = torch.arange(width, dtype=torch.float32, device=similarity.device)[None, :]
    near = (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
    similarity[near] = floor


def segment_objects(
    predictor: SamPredictor,
    concept: Concept,
    image: Optional[np.ndarray] = None,
    max_objects: int = 5,
    min_similarity: Optional[float] = None,
    max_overlap_iou: float = 0.8,
) -> List[Segmentation]:
    """Find up to `max_objects` instances of the concept in `image` (or the image already set).

    The image is encoded once (only when `image` is given) and the similarity
    map computed once. Then, repeatedly: segment at the map's peak; stop when
    the peak is below `min_similarity`, the mask is empty, or it overlaps an
    object already found by IoU >= `max_overlap_iou`; otherwise keep it and
    set its pixels, and those within one feature cell of its positive point,
    to the map's minimum. PerSAM's negative point always comes from the
    original (unsuppressed) map. Returns the objects found, in order (maybe none).
    """
    if max_objects < 1:
        return []
    if image is not None:
        predictor.set_image(image)
    if not predictor.is_image_set:
        raise RuntimeError("no image is set: pass an image or call predictor.set_image() first")
    similarity = locate(predictor, concept, predictor.current_image())
    original = similarity
    similarity = similarity.clone()  # suppressed in place below
    floor = similarity.min()
    # One feature cell, in original pixels: suppress at least that much around the positive point
    # so the same peak cannot be chosen again when the mask missed its own prompt.
    cell = max(predictor.original_size) / predictor.features.shape[-1]
    found: List[Segmentation] = []
    while len(found) < max_objects:
        # Positive point, peak and guidance from the suppressed map; the negative point from the
        # original one: in the suppressed map every found object's pixels share the minimum, so its
        # argmin could land inside an object already found.
        result = segment_at(predictor, concept, similarity, min_similarity, negative_similarity=original)
        if not result.found or not result.mask.any():
            break
        if any(mask_iou(result.mask, other.mask) >= max_overlap_iou for other in found):
            break
        found.append(result)
        similarity[torch.from_numpy(result.mask).to(similarity.device)] = floor
        positive = result.points[result.labels == 1][0]
        _suppress_point(similarity, positive, cell, floor)
    return found
