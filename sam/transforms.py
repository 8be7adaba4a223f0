"""Geometry between an original image and SAM's square input frame.

The one place where images and masks are resized to the input frame, where
prompt coordinates are scaled into it, and where low-resolution logits are
brought back to the original size. The uint8 resize runs through Pillow on
the CPU (it is what SAM's own preprocessing computes); everything else works
on tensors on any device.
"""

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int = 1024) -> Tuple[int, int]:
    """Size (h, w) of an image resized so that its longest side is `long_side` (SAM's rounding).

    A side never shrinks below one pixel (SAM itself fails on such slivers).
    """
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_longest_side(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """Resize a uint8 image H x W x 3 (RGB) or H x W (a mask) so its longest side is `long_side`.

    This is SAM's `ResizeLongestSide.apply_image` value for value: Pillow's
    BILINEAR resize of the uint8 image (fixed-point weights, halves rounded
    up), which is what the official checkpoints were trained and evaluated
    with. Returns uint8 h x w x 3 (or h x w).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected a uint8 H x W x 3 image or H x W mask, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    new_h, new_w = preprocess_shape(height, width, long_side)
    if (new_h, new_w) == (height, width):
        return image.copy()
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def pad_to_square(x: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """Zero-pad ... x h x w at the bottom and right to ... x size x size."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))


def scale_coords(coords: torch.Tensor, original_size: Tuple[int, int], long_side: int = 1024) -> torch.Tensor:
    """Points (..., 2) as (x, y) in original pixels -> the same points in the input frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    coords = coords.to(torch.float32).clone()
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def scale_boxes(boxes: torch.Tensor, original_size: Tuple[int, int], long_side: int = 1024) -> torch.Tensor:
    """Boxes (..., 4) as (x0, y0, x1, y1) in original pixels -> input frame."""
    corners = scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side)
    return corners.reshape(boxes.shape)


def upscale_logits(
    low_res: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    img_size: int = 1024,
) -> torch.Tensor:
    """Low-resolution maps B x M x h x w -> B x M x H x W at the original image size.

    Bilinear to the padded square input frame, crop the padding, bilinear to
    the original size: how SAM brings mask logits back, and how PerSAM brings
    back its similarity map.
    """
    x = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
