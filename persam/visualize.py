"""Pictures of results: masks over the image, prompt points, boxes, similarity heat maps (OpenCV).

    overlay(image, masks, points, labels, box)  translucent coloured masks + prompts, RGB uint8
    heatmap(similarity)                         an H x W map in a colour map, RGB uint8
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import cv2
import numpy as np

from .io import davis_palette

__all__ = ["overlay", "heatmap", "mask_colors"]

POSITIVE = (0, 255, 0)  # RGB green
NEGATIVE = (255, 0, 0)  # RGB red
BOX = (255, 255, 0)  # RGB yellow

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def mask_colors(n: int) -> np.ndarray:
    """n distinct RGB colours (the DAVIS palette from index 1), n x 3 uint8."""
    pal = davis_palette()[1:]
    return pal[np.arange(n) % len(pal)]


def _as_mask_list(masks, shape) -> list:
    """Masks given as one H x W bool map, an N x H x W stack, a list of maps, or None."""
    if masks is None:
        return []
    if isinstance(masks, (list, tuple)):
        items = [_numpy(m) for m in masks]
    else:
        arr = _numpy(masks)
        items = [arr] if arr.ndim == 2 else list(arr)
    out = []
    for m in items:
        m = np.asarray(m).astype(bool)
        if m.shape != tuple(shape):
            raise ValueError(f"mask of shape {m.shape} does not match the image {tuple(shape)}")
        out.append(m)
    return out


def _blend(img: np.ndarray, masks: list, colors: np.ndarray, alpha: float) -> np.ndarray:
    """The image with each mask's pixels blended towards its colour, in order: pixel * (1 - alpha)
    + colour * alpha in float32, rounded half up, RGB uint8.

    A pixel under one mask takes its value from a 256-entry table per channel, made with the
    very float32 operations applied to each pixel (the same bytes, tested; 2-2.4 ms instead of
    18-35 ms for a 780 px photo); pixels under several masks are blended one mask after another in float32,
    as the formula says, and rounded once.
    """
    out = img.copy()
    if not masks:
        return out
    coverage = np.zeros(img.shape[:2], dtype=np.int32)
    for m in masks:
        coverage += m
    alone = coverage == 1
    for m, color in zip(masks, colors):
        table = _blend_formula(np.arange(256, dtype=np.float32)[:, None], color, alpha)  # 256 x 3
        table = np.clip(table + 0.5, 0, 255).astype(np.uint8)
        cv2.copyTo(cv2.LUT(img, table.reshape(256, 1, 3)), (m & alone).view(np.uint8), out)  # in place
    shared = coverage > 1
    if shared.any():
        pixels = img[shared].astype(np.float32)
        for m, color in zip(masks, colors):
            under = m[shared]
            pixels[under] = _blend_formula(pixels[under], color, alpha)
        out[shared] = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
    return out


def _blend_formula(pixels: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """pixels (N x 3 float32) blended towards color (3,): float32."""
    return pixels * (1 - alpha) + color.astype(np.float32) * alpha


def overlay(
    image: np.ndarray,
    masks=None,
    points: Optional[ArrayLike] = None,
    labels: Optional[ArrayLike] = None,
    box: Optional[ArrayLike] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The image (H x W x 3 RGB uint8) with translucent coloured masks, their outlines,
    prompt points (green positive, red negative; `labels` 1/0, all positive if None)
    and box outlines (one box x0, y0, x1, y1 or N x 4). Returns a new RGB uint8 array."""
    img = np.ascontiguousarray(_numpy(image).astype(np.uint8))
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {img.shape}")
    h, w = img.shape[:2]
    mask_list = _as_mask_list(masks, (h, w))
    colors = mask_colors(len(mask_list))
    out = _blend(img, mask_list, colors, alpha)
    thickness = max(1, round(max(h, w) / 400))
    for m, color in zip(mask_list, colors):
        if m.any():
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    if box is not None:
        boxes = _numpy(box).reshape(-1, 4)
        for x0, y0, x1, y1 in boxes:
            cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), BOX, thickness)
    if points is not None:
        pts = _numpy(points).reshape(-1, 2)
        labs = np.ones(len(pts), dtype=np.int64) if labels is None else _numpy(labels).reshape(-1)
        radius = max(3, round(max(h, w) / 100))
        for (x, y), label in zip(pts, labs):
            centre = (int(round(float(x))), int(round(float(y))))
            cv2.circle(out, centre, radius + max(1, radius // 3), (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(out, centre, radius, POSITIVE if label > 0 else NEGATIVE, -1, cv2.LINE_AA)
    return out


def heatmap(
    similarity: ArrayLike,
    value_range: Optional[Sequence[float]] = None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """An H x W map (e.g. the target similarity) in a colour map: RGB uint8 H x W x 3.

    Values are scaled from `value_range` (default: the map's own min..max) to 0..255;
    NaNs count as the minimum."""
    sim = _numpy(similarity).astype(np.float32)
    if sim.ndim != 2:
        sim = np.squeeze(sim)
    if sim.ndim != 2:
        raise ValueError(f"expected an H x W map, got shape {sim.shape}")
    finite = np.isfinite(sim)
    if value_range is None:
        lo, hi = (float(sim[finite].min()), float(sim[finite].max())) if finite.any() else (0.0, 1.0)
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
    sim = np.where(finite, sim, lo)
    scaled = (sim - lo) / (hi - lo) if hi > lo else np.zeros_like(sim)
    gray = np.clip(scaled * 255 + 0.5, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(gray, colormap)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
