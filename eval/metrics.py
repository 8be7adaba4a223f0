"""Segmentation metrics: IoU and Boundary IoU (PerSeg), J and F (DAVIS 2017).

The DAVIS functions follow the official davis2017-evaluation definitions
(``seg2bmap`` thin boundaries, disk-dilation matching, 4-bin decay); Boundary IoU
follows Cheng et al., CVPR 2021 (band = mask minus its erosion, image border
counted as background).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from skimage.morphology import disk

__all__ = [
    "intersection_union",
    "iou",
    "boundary_width",
    "boundary_region",
    "boundary_intersection_union",
    "boundary_iou",
    "class_scores",
    "miou",
    "db_eval_iou",
    "seg2bmap",
    "f_measure",
    "db_eval_boundary",
    "db_statistics",
    "davis_sequence_scores",
    "davis_summary",
]


def _pair(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    return pred, gt


# --------------------------------------------------------------------------- #
# IoU and Boundary IoU
# --------------------------------------------------------------------------- #


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> Tuple[int, int]:
    """Pixel counts of the intersection and union of two binary masks."""
    pred, gt = _pair(pred, gt)
    inter = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    return inter, union


def _ratio(inter: int, union: int) -> float:
    return 1.0 if union == 0 else inter / union


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    return _ratio(*intersection_union(pred, gt))


def boundary_width(shape: Sequence[int], dilation_ratio: float = 0.02) -> int:
    """Band width d = max(1, round(dilation_ratio * image diagonal)) in pixels."""
    h, w = int(shape[0]), int(shape[1])
    return max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))


def boundary_region(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Inner boundary band of a mask: the mask minus its erosion by d pixels.

    The erosion uses a (2d+1) x (2d+1) square with everything outside the image
    counted as background, which equals the official 1-pixel zero pad followed by
    d iterations of a 3 x 3 erosion.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    d = boundary_width(mask.shape, dilation_ratio)
    kernel = np.ones((2 * d + 1, 2 * d + 1), dtype=np.uint8)
    eroded = cv2.erode(
        mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0
    ).astype(bool)
    return mask & ~eroded


def boundary_intersection_union(
    pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02
) -> Tuple[int, int]:
    """Intersection and union pixel counts of the two masks' boundary bands."""
    pred, gt = _pair(pred, gt)
    return intersection_union(boundary_region(pred, dilation_ratio), boundary_region(gt, dilation_ratio))


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al. 2021); 1.0 when both masks are empty."""
    return _ratio(*boundary_intersection_union(pred, gt, dilation_ratio))


# --------------------------------------------------------------------------- #
# PerSeg aggregation
# --------------------------------------------------------------------------- #


def class_scores(
    pairs: Iterable[Tuple[np.ndarray, np.ndarray]], dilation_ratio: float = 0.02
) -> Dict[str, float]:
    """Scores of one PerSeg class from its (pred, gt) test pairs.

    ``iou`` and ``biou`` are sum of intersections / sum of unions over the images
    (as the PerSAM evaluation aggregates); ``mean_image_iou`` is the plain mean of
    per-image IoUs; ``n_images`` counts the pairs. ``pairs`` may be a generator.
    """
    inter_sum = union_sum = b_inter_sum = b_union_sum = 0
    image_ious: List[float] = []
    for pred, gt in pairs:
        inter, union = intersection_union(pred, gt)
        b_inter, b_union = boundary_intersection_union(pred, gt, dilation_ratio)
        inter_sum += inter
        union_sum += union
        b_inter_sum += b_inter
        b_union_sum += b_union
        image_ious.append(_ratio(inter, union))
    if not image_ious:
        raise ValueError("class_scores needs at least one (prediction, ground truth) pair")
    return {
        "iou": _ratio(inter_sum, union_sum),
        "biou": _ratio(b_inter_sum, b_union_sum),
        "mean_image_iou": float(np.mean(image_ious)),
        "n_images": len(image_ious),
    }


def miou(
    per_class: Union[Mapping[str, Union[float, Mapping[str, float]]], Sequence[Union[float, Mapping[str, float]]]],
    key: str = "iou",
) -> float:
    """Mean over classes of one score (``"iou"`` -> mIoU, ``"biou"`` -> mBIoU).

    ``per_class`` maps class -> :func:`class_scores` dict (or -> a float), or is a
    list of those.
    """
    values = per_class.values() if isinstance(per_class, Mapping) else per_class
    scores = [float(v[key]) if isinstance(v, Mapping) else float(v) for v in values]
    if not scores:
        raise ValueError("miou needs at least one class")
    return float(np.mean(scores))


# --------------------------------------------------------------------------- #
# DAVIS 2017: J (region) and F (boundary)
# --------------------------------------------------------------------------- #


def db_eval_iou(
    annotation: np.ndarray, segmentation: np.ndarray, void_pixels: Optional[np.ndarray] = None
) -> Union[float, np.ndarray]:
    """Region similarity J; 1 where both are empty. 2-D -> float, N x H x W -> N values."""
    annotation, segmentation = _pair(annotation, segmentation)
    valid = ~np.asarray(void_pixels, dtype=bool) if void_pixels is not None else True
    inter = np.count_nonzero(annotation & segmentation & valid, axis=(-2, -1))
    union = np.count_nonzero((annotation | segmentation) & valid, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j.astype(float)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Thin (1 px) boundary map of a binary mask, as the official DAVIS ``seg2bmap``.

    A pixel is on the boundary when it differs from its east, south or south-east
    neighbour; the last row only compares east, the last column only south, and
    the bottom-right pixel is never a boundary.
    """
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"seg2bmap needs a 2-D mask, got shape {seg.shape}")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def _bound_pixels(shape: Sequence[int], bound_th: float) -> float:
    """Matching tolerance in pixels: bound_th itself if >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return bound_th
    return float(np.ceil(bound_th * np.linalg.norm(shape[:2])))


def f_measure(
    foreground_mask: np.ndarray,
    gt_mask: np.ndarray,
    void_pixels: Optional[np.ndarray] = None,
    bound_th: float = 0.008,
) -> float:
    """Boundary F-measure of one frame (official DAVIS edge cases)."""
    fg, gt = _pair(foreground_mask, gt_mask)
    if fg.ndim != 2:
        raise ValueError(f"f_measure needs 2-D masks, got shape {fg.shape}")
    if void_pixels is not None:
        valid = ~np.asarray(void_pixels, dtype=bool)
        fg, gt = fg & valid, gt & valid
    radius = _bound_pixels(fg.shape, bound_th)
    fg_boundary = seg2bmap(fg)
    gt_boundary = seg2bmap(gt)
    n_fg = int(np.count_nonzero(fg_boundary))
    n_gt = int(np.count_nonzero(gt_boundary))
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0 while the other is 1
    selem = disk(radius).astype(np.uint8)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), selem).astype(bool)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), selem).astype(bool)
    precision = np.count_nonzero(fg_boundary & gt_dil) / n_fg
    recall = np.count_nonzero(gt_boundary & fg_dil) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    bound_th: float = 0.008,
    *,
    void_pixels: Optional[np.ndarray] = None,
) -> Union[float, np.ndarray]:
    """Boundary F-measure; 2-D -> float, N x H x W -> N values."""
    annotation, segmentation = _pair(annotation, segmentation)
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    if annotation.ndim == 3:
        voids = [None] * annotation.shape[0] if void_pixels is None else void_pixels
        return np.array(
            [f_measure(s, a, v, bound_th) for a, s, v in zip(annotation, segmentation, voids)],
            dtype=float,
        )
    raise ValueError(f"db_eval_boundary does not support arrays with {annotation.ndim} dimensions")


def db_statistics(per_frame_values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay of per-frame scores, NaN-safe.

    Decay follows davis2017-evaluation: 4 bins with edges
    ``round(linspace(1, N, 5)) - 1`` (each bin includes its right edge);
    decay = mean(first bin) - mean(last bin). NaN frames are ignored (recall is
    taken over the non-NaN frames); all-NaN or empty input gives NaNs.
    """
    values = np.asarray(per_frame_values, dtype=float).reshape(-1)
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(finite.mean())
    recall = float(np.mean(finite > 0.5))
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[edges[i] : edges[i + 1] + 1] for i in range(4)]
    decay = _nanmean(bins[0]) - _nanmean(bins[3])
    return mean, recall, decay


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _stats_dict(values: np.ndarray) -> Dict[str, float]:
    mean, recall, decay = db_statistics(values)
    return {"mean": mean, "recall": recall, "decay": decay}


def davis_sequence_scores(
    gt_frames: Sequence[Optional[np.ndarray]],
    pred_frames: Sequence[np.ndarray],
    object_ids: Iterable[int],
    bound_th: float = 0.008,
) -> Dict[str, object]:
    """Semi-supervised DAVIS scores of one sequence, first and last frames excluded.

    ``gt_frames`` and ``pred_frames`` are per-frame H x W label maps (object ids),
    all frames of the sequence in order; a ``None`` ground-truth frame (not
    annotated) scores NaN and is skipped by the statistics. Returns::

        {"objects": {id: {"J": per-frame array, "F": per-frame array,
                          "J_stats": {mean, recall, decay}, "F_stats": {...}}},
         "J": {mean, recall, decay}, "F": {...},   # averaged over objects
         "J&F": (J mean + F mean) / 2}
    """
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predicted frames")
    ids = [int(i) for i in object_ids]
    if not ids:
        raise ValueError("davis_sequence_scores needs at least one object id")
    inner = range(1, len(gt_frames) - 1)
    j_values = {i: np.full(len(inner), np.nan) for i in ids}
    f_values = {i: np.full(len(inner), np.nan) for i in ids}
    for k, t in enumerate(inner):
        gt, pred = gt_frames[t], pred_frames[t]
        if gt is None:
            continue
        if pred is None:
            raise ValueError(f"prediction for frame {t} is missing")
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"frame {t}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
        for obj in ids:
            gt_obj, pred_obj = gt == obj, pred == obj
            j_values[obj][k] = db_eval_iou(gt_obj, pred_obj)
            f_values[obj][k] = f_measure(pred_obj, gt_obj, bound_th=bound_th)
    objects = {
        obj: {
            "J": j_values[obj],
            "F": f_values[obj],
            "J_stats": _stats_dict(j_values[obj]),
            "F_stats": _stats_dict(f_values[obj]),
        }
        for obj in ids
    }
    return _summarise(list(objects.values()), objects)


def _summarise(object_results: List[Mapping[str, object]], objects: Optional[dict] = None) -> Dict[str, object]:
    summary: Dict[str, object] = {}
    for metric in ("J", "F"):
        stats = [r[f"{metric}_stats"] for r in object_results]
        summary[metric] = {
            key: _nanmean(np.array([s[key] for s in stats], dtype=float)) for key in ("mean", "recall", "decay")
        }
    summary["J&F"] = (summary["J"]["mean"] + summary["F"]["mean"]) / 2
    if objects is not None:
        summary = {"objects": objects, **summary}
    return summary


def davis_summary(sequence_scores: Iterable[Mapping[str, object]]) -> Dict[str, object]:
    """Dataset-level J, F (mean / recall / decay) and J&F, averaged over all objects
    of all sequences, as the official evaluation reports them."""
    object_results = [obj for seq in sequence_scores for obj in seq["objects"].values()]
    if not object_results:
        raise ValueError("davis_summary needs at least one scored object")
    return _summarise(object_results)
