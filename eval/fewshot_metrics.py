"""Few-shot segmentation scores as HSNet / Matcher / GF-SAM compute them (``matcher/common/evaluation.py``
and ``logger.py``'s ``AverageMeter``).

Each episode gives the intersection and union of its prediction and ground truth for both labels,
background (0) and foreground (1). They are summed per class over the class's episodes; then

* a class's IoU is its summed foreground intersection / summed foreground union (a union of 0
  counts as 1, so a class never predicted nor present scores 0, as in the original);
* mIoU is the mean class IoU over the benchmark's classes (every class of the split or fold,
  including one no episode drew, which scores 0);
* FB-IoU is the mean over background and foreground of (intersection summed over those classes) /
  (union summed over them).

Scores are fractions 0..1 here; the papers print them x 100.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

__all__ = ["episode_areas", "FewShotMeter"]


def episode_areas(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(intersection, union) pixel counts of one episode, each [background, foreground]."""
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    inter = np.array([np.count_nonzero(~pred & ~gt), np.count_nonzero(pred & gt)], dtype=np.int64)
    union = np.array([np.count_nonzero(~pred | ~gt), np.count_nonzero(pred | gt)], dtype=np.int64)
    return inter, union


class FewShotMeter:
    """Sums of episode areas per class (``add``) and the benchmark's scores (``scores``).

    `class_ids` are the benchmark's classes, in the order they are reported."""

    def __init__(self, class_ids: Sequence[int]):
        self.class_ids = [int(c) for c in class_ids]
        self.inter: Dict[int, np.ndarray] = {c: np.zeros(2, np.int64) for c in self.class_ids}
        self.union: Dict[int, np.ndarray] = {c: np.zeros(2, np.int64) for c in self.class_ids}
        self.episodes: Dict[int, int] = {c: 0 for c in self.class_ids}

    def add(self, class_id: int, inter: np.ndarray, union: np.ndarray) -> None:
        if class_id not in self.inter:
            raise ValueError(f"class {class_id} is not one of the benchmark's classes")
        self.inter[class_id] += inter
        self.union[class_id] += union
        self.episodes[class_id] += 1

    def class_iou(self, class_id: int) -> float:
        return float(self.inter[class_id][1] / max(self.union[class_id][1], 1))

    def miou(self) -> float:
        return float(np.mean([self.class_iou(c) for c in self.class_ids]))

    def fb_iou(self) -> float:
        inter = np.sum([self.inter[c] for c in self.class_ids], axis=0)
        union = np.sum([self.union[c] for c in self.class_ids], axis=0)
        if np.any(union == 0):
            raise ValueError("FB-IoU needs at least one scored pixel")
        return float(np.mean(inter / union))

    def scores(self) -> Dict[str, object]:
        """{"classes": {id: {"iou", "episodes"}}, "miou", "fb_iou"}."""
        classes = {c: {"iou": self.class_iou(c), "episodes": self.episodes[c]} for c in self.class_ids}
        return {"classes": classes, "miou": self.miou(), "fb_iou": self.fb_iou()}
