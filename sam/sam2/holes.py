"""Filling small holes in SAM 2's mask logits, on every device.

Meta's video predictor can fill the small background islands of each predicted mask (``fill_hole_area``):
every 8-connected region of logits <= 0 whose area is at most the limit gets the logit 0.1, so it turns
foreground. It does so with a CUDA extension that CPU installs lack (they warn and skip it). This is the same
rule with OpenCV's connected components, on the CPU whatever the tensor's device. It is off by default
(``max_area=0``), which is also how the tracker matches Meta's predictor exactly.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["fill_small_holes"]

HOLE_FILL_LOGIT = 0.1


def fill_small_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """mask_logits (N, 1, H, W) -> the same with background regions of at most max_area pixels set to 0.1.

    Regions are 8-connected; any region counts, including one touching the border, as in Meta's
    post-processing. ``max_area <= 0`` returns the input unchanged.
    """
    if max_area <= 0:
        return mask_logits
    background = (mask_logits <= 0).to("cpu", torch.uint8).numpy()
    is_hole = np.zeros(background.shape, dtype=bool)
    for index in range(background.shape[0]):
        plane = background[index, 0]
        count, labels, stats, _ = cv2.connectedComponentsWithStats(plane, connectivity=8)
        small = np.zeros(count, dtype=bool)
        small[1:] = stats[1:, cv2.CC_STAT_AREA] <= max_area  # label 0 is the foreground
        is_hole[index, 0] = small[labels] & (plane > 0)
    holes = torch.from_numpy(is_hole).to(mask_logits.device)
    return torch.where(holes, torch.full_like(mask_logits, HOLE_FILL_LOGIT), mask_logits)
