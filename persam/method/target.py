"""Step 1: the target, from reference image features and the reference mask.

PERSAM_METHOD.md, step 1: put the mask in the frame of the 64 x 64 feature
grid, keep the cells whose centre lies inside the object (coverage >= tau),
and summarise their features as a target vector (for similarity) and a
target embedding (for prompting the decoder).
"""

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam.transforms import pad_to_square, resize_longest_side

TARGET_MODES = ("mean", "max", "mean_max")


def mask_in_input_frame(mask: np.ndarray, img_size: int = 1024) -> torch.Tensor:
    """Reference mask H x W (bool or 0/1) -> 1 x 1 x S x S in [0, 1], resized and zero-padded exactly like the image.

    The mask goes through the image's own resize as a 0/255 uint8 picture (as
    the reference code resizes its mask with SAM's image transform).
    """
    levels = np.where(np.asarray(mask, dtype=bool), np.uint8(255), np.uint8(0))
    resized = torch.from_numpy(resize_longest_side(levels, img_size)).to(torch.float32) / 255.0
    return pad_to_square(resized[None], img_size)[None]


def mask_on_grid(mask: np.ndarray, grid_size: int = 64, img_size: int = 1024) -> torch.Tensor:
    """The mask's value at every grid cell centre (bilinear), grid x grid in [0, 1]."""
    return _at_cell_centres(mask_in_input_frame(mask, img_size), grid_size)


def mask_area_on_grid(mask: np.ndarray, grid_size: int = 64, img_size: int = 1024) -> torch.Tensor:
    """Fraction of every grid cell covered by the mask (grid x grid), for masks too small to reach a cell centre."""
    return _cell_coverage(mask_in_input_frame(mask, img_size), grid_size)


def _at_cell_centres(framed: torch.Tensor, grid_size: int) -> torch.Tensor:
    return F.interpolate(framed, size=(grid_size, grid_size), mode="bilinear", align_corners=False)[0, 0]


def _cell_coverage(framed: torch.Tensor, grid_size: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(framed, grid_size)[0, 0]


def target_cells(mask: np.ndarray, tau: float = 0.97, grid_size: int = 64, img_size: int = 1024) -> torch.Tensor:
    """Grid cells of the target: grid x grid bool, never empty for a non-empty mask.

    Cells whose centre value is at least `tau`. If none reaches it (a thin or
    tiny object), the cells of highest coverage are taken instead.
    """
    if not np.any(mask):
        raise ValueError("the reference mask is empty: there is no target to learn")
    framed = mask_in_input_frame(mask, img_size)
    at_centres = _at_cell_centres(framed, grid_size)
    cells = at_centres >= tau
    if cells.any():
        return cells
    coverage = torch.maximum(at_centres, _cell_coverage(framed, grid_size))
    return coverage >= coverage.max() - 1e-6


def target_features(features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Image features 1 x C x h x w and cells h x w (bool) -> the target cells' features K x C."""
    return features[0].permute(1, 2, 0)[cells.to(features.device)]


def pool_target_features(per_reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several references (few-shot): pool their target cells into one K x C set."""
    return torch.cat(list(per_reference), dim=0)


def target_vector(target_feats: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """K x C target features -> unit-length C vector: mean (PerSAM), max, or (max + mean) / 2 (PerSAM-F)."""
    if mode == "mean":
        vector = target_feats.mean(0)
    elif mode == "max":
        vector = target_feats.max(0).values
    elif mode == "mean_max":
        vector = (target_feats.max(0).values + target_feats.mean(0)) / 2
    else:
        raise ValueError(f"target mode must be one of {', '.join(TARGET_MODES)}, not {mode!r}")
    return vector / vector.norm()


def target_embedding(target_feats: torch.Tensor) -> torch.Tensor:
    """K x C target features -> 1 x C target embedding for prompting (plain mean, not normalised)."""
    return target_feats.mean(0, keepdim=True)


def reference_mask_from_prompts(
    predictor, points: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
) -> Optional[np.ndarray]:
    """A reference mask made by SAM from clicks (N x 2) or a box, on the image set in `predictor`.

    The clicks are on the object unless `labels` (N: 1 on the object, 0 on the
    background) says otherwise; at least one must be on the object.
    The best-scoring multimask output that is neither empty nor the whole
    image; None when SAM gives no such mask.
    """
    if (points is None) == (box is None):
        raise ValueError("give either clicks or a box for the reference")
    if box is not None:
        prediction = predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=True)
    else:
        points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        if labels is None:
            labels = np.ones(len(points), dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} clicks but {len(labels)} labels")
        if not (labels == 1).any():
            raise ValueError("at least one click must be on the object (label 1)")
        prediction = predictor.predict(points, labels, multimask_output=True)
    masks, scores = np.asarray(prediction.masks), np.asarray(prediction.iou_scores)
    for index in np.argsort(-scores, kind="stable"):
        if masks[index].any() and not masks[index].all():
            return masks[index]
    return None
