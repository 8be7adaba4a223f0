"""Pictures of results: masks over the image, prompt points, boxes, similarity heat maps (OpenCV).

    overlay(image, masks, points, labels, box)  translucent coloured masks + prompts, RGB uint8
    mark_not_found(picture)                     a red frame and "not found" (segment, apply, track)
    annotate(picture, notes, red_frame)         notes in the top-left corner, optionally a red frame
    heatmap(similarity, image=photo)            an H x W map in a colour map, over the photo, with its scale
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from persam.data.io import davis_palette

__all__ = ["overlay", "heatmap", "mask_colors", "mark_not_found", "annotate", "NOT_FOUND"]

POSITIVE = (0, 255, 0)  # RGB green
NEGATIVE = (255, 0, 0)  # RGB red
BOX = (255, 255, 0)  # RGB yellow
FRAME = (255, 0, 0)  # RGB red: the frame of a picture where the object is not found
NOT_FOUND = "not found"
NOT_FOUND_TEXT = (255, 64, 64)  # RGB light red
NOTE_TEXT = (255, 255, 255)  # RGB white

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
    very float32 operations applied to each pixel (the same bytes, tested; several times quicker
    than blending each pixel: docs/performance.md, Overlays); pixels under several masks are
    blended one mask after another in float32, as the formula says, and rounded once.
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
    colors: Optional[ArrayLike] = None,
) -> np.ndarray:
    """The image (H x W x 3 RGB uint8) with translucent coloured masks, their outlines,
    prompt points (green positive, red negative; `labels` 1/0, all positive if None)
    and box outlines (one box x0, y0, x1, y1 or N x 4). `colors`: the masks' RGB colours
    (N x 3; default :func:`mask_colors`). Returns a new RGB uint8 array."""
    img = np.ascontiguousarray(_numpy(image).astype(np.uint8))
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {img.shape}")
    h, w = img.shape[:2]
    mask_list = _as_mask_list(masks, (h, w))
    colors = mask_colors(len(mask_list)) if colors is None else np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) < len(mask_list):
        raise ValueError(f"{len(mask_list)} masks but {len(colors)} colours")
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


def annotate(picture: np.ndarray, notes: Sequence[Tuple[str, Tuple[int, int, int]]] = (),
             red_frame: bool = False) -> np.ndarray:
    """`picture` (H x W x 3 RGB uint8) with a red frame around it (`red_frame`) and `notes`
    ((text, RGB colour) each) one per line in its top-left corner, light text on black.
    Returns a new RGB uint8 array."""
    out = np.ascontiguousarray(_numpy(picture).astype(np.uint8)).copy()
    h, w = out.shape[:2]
    if red_frame:
        border = max(2, round(max(h, w) / 120))
        cv2.rectangle(out, (0, 0), (w - 1, h - 1), FRAME, border)
    scale = _text_scale(h, w)
    y = 0
    for text, colour in notes:
        y = _note(out, text, colour, 0, y, scale)
    return out


def mark_not_found(picture: np.ndarray, text: str = NOT_FOUND) -> np.ndarray:
    """`picture` framed in red and marked `text` ("not found") in its top-left corner: the
    picture of an image or a video frame where the object was not found."""
    return annotate(picture, [(text, NOT_FOUND_TEXT)], red_frame=True)


def _text_scale(h: int, w: int) -> float:
    return max(0.35, max(h, w) / 1400)


def _note(out: np.ndarray, text: str, colour, x: int, y: int, scale: float) -> int:
    """Draw `text` on a black box whose top-left corner is (x, y), in place; the box's bottom."""
    thickness = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(3, th // 3)
    cv2.rectangle(out, (x, y), (x + tw + 2 * pad, y + th + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(out, text, (x + pad, y + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return y + th + base + 2 * pad


def heatmap(
    similarity: ArrayLike,
    value_range: Optional[Sequence[float]] = None,
    colormap: int = cv2.COLORMAP_JET,
    image: Optional[np.ndarray] = None,
    alpha: float = 0.5,
    scale: bool = True,
) -> np.ndarray:
    """An H x W map (e.g. the target similarity) in a colour map: RGB uint8 H x W x 3.

    Values are scaled from `value_range` (default: the map's own min..max) to 0..255;
    NaNs count as the minimum.  With `image` (H x W x 3 RGB uint8, the photo the map is of)
    the colours are laid over the photo as saliency pictures are: the photo in gray (so
    that every hue is the map's) blended with the colour map, `alpha` the colours' share;
    `scale` then adds the colour scale, a bar from the lowest to the highest value with
    both values, in the bottom-left corner (where it fits).  Without `image`, the bare
    colour map."""
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
    colours = cv2.cvtColor(cv2.applyColorMap(gray, colormap), cv2.COLOR_BGR2RGB)
    if image is None:
        return colours
    photo = np.ascontiguousarray(_numpy(image).astype(np.uint8))
    if photo.shape != colours.shape:
        raise ValueError(f"the image {photo.shape} and the map {sim.shape} differ in size")
    base = cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    out = cv2.addWeighted(base, 1.0 - alpha, colours, alpha, 0.0)
    if scale:
        _colour_scale(out, lo, hi, colormap)
    return out


def _colour_scale(out: np.ndarray, lo: float, hi: float, colormap: int) -> None:
    """Draw the colour scale in the bottom-left corner of `out`, in place: the colour map from
    `lo` (left) to `hi` (right) as a bar, the two values above it, on black; nothing where it
    would take more than half the picture's width or a third of its height."""
    h, w = out.shape[:2]
    font_scale = _text_scale(h, w)
    thickness = max(1, round(font_scale * 2))
    low, high = f"{lo:.2f}", f"{hi:.2f}"
    (lw, th), base = cv2.getTextSize(low, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    (hw, _), _ = cv2.getTextSize(high, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    pad = max(3, th // 3)
    bar_w = max(lw + hw + 3 * pad, round(w / 4))
    bar_h = max(4, th // 2 + 2)
    box_w, box_h = bar_w + 2 * pad, th + base + bar_h + 3 * pad
    if box_w > w / 2 or box_h > h / 3:
        return
    top = h - box_h
    cv2.rectangle(out, (0, top), (box_w - 1, h - 1), (0, 0, 0), -1)
    text_y = top + pad + th
    cv2.putText(out, low, (pad, text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, NOTE_TEXT, thickness, cv2.LINE_AA)
    cv2.putText(out, high, (pad + bar_w - hw, text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, NOTE_TEXT, thickness,
                cv2.LINE_AA)
    ramp = np.linspace(0, 255, bar_w).round().astype(np.uint8)[None, :].repeat(bar_h, axis=0)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, colormap), cv2.COLOR_BGR2RGB)
    bar_top = text_y + base + pad
    out[bar_top:bar_top + bar_h, pad:pad + bar_w] = bar
