"""Frames, masks and points to and from SAM 2.1's square input, as Meta's video predictor does it.

Meta's loader (``sam2/utils/misc.py``, ``_load_img_as_tensor`` and the JPEG-folder path of
``load_video_frames``) resizes each frame with Pillow to a *square* image_size x image_size (aspect
ratio not kept; Pillow's default filter for RGB, bicubic), divides by 255 in float64, stores float32
and normalises with the ImageNet mean and std in float32. Doing exactly that here means the same
pixels reach the encoder. A first-frame mask is brought to the square by antialiased bilinear
interpolation and thresholded at 0.5 (``add_new_mask``); mask logits go back to the video's size by
plain bilinear interpolation (``_get_orig_video_res_output``).

(Meta's *image* predictor, ``SAM2Transforms``, resizes a float tensor with torchvision instead, which
gives slightly different pixels; the video path is the one the tracker follows.)
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "frame_to_input",
    "logits_to_frame_size",
    "mask_to_input",
    "points_to_input",
    "resize_frame",
]

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def resize_frame(frame: Union[np.ndarray, Image.Image], image_size: int = 1024) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8 array or a PIL image -> (image_size, image_size, 3) uint8, Pillow bicubic."""
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(_as_rgb_uint8(frame))
    return np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))


def frame_to_input(frame: Union[np.ndarray, Image.Image], image_size: int = 1024) -> torch.Tensor:
    """An RGB frame -> the encoder's input (3, image_size, image_size) float32, normalised as Meta's loader."""
    pixels = resize_frame(frame, image_size)
    scaled = torch.from_numpy(pixels / 255.0).permute(2, 0, 1).to(torch.float32)  # float64 division, as Meta's
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return (scaled - mean) / std


def mask_to_input(mask: Union[np.ndarray, torch.Tensor], image_size: int = 1024) -> torch.Tensor:
    """A binary mask (H, W) at the frame's size -> (1, 1, image_size, image_size) float32 of 0 / 1."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if mask.dim() != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
    as_float = (mask > 0).float()[None, None]
    if tuple(mask.shape) == (image_size, image_size):
        return as_float
    resized = F.interpolate(as_float, size=(image_size, image_size), align_corners=False, mode="bilinear",
                            antialias=True)
    return (resized >= 0.5).float()


def points_to_input(points: Union[np.ndarray, torch.Tensor], frame_size: Tuple[int, int],
                    image_size: int = 1024) -> torch.Tensor:
    """Points (..., 2) as (x, y) pixels of a frame of size (H, W) -> the same points in the square input."""
    points = torch.as_tensor(points, dtype=torch.float32)
    height, width = frame_size
    return points / torch.tensor([width, height], dtype=torch.float32) * image_size  # Meta's order of operations


def logits_to_frame_size(logits: torch.Tensor, frame_size: Tuple[int, int]) -> torch.Tensor:
    """Mask logits (B, M, h, w) at any model size -> (B, M, H, W) at the frame's size, bilinear."""
    if tuple(logits.shape[-2:]) == tuple(frame_size):
        return logits
    return F.interpolate(logits, size=tuple(frame_size), mode="bilinear", align_corners=False)


def _as_rgb_uint8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8 RGB, got {frame.dtype}")
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ValueError(f"a frame must be (H, W, 3) RGB, got shape {frame.shape}")
    return frame[:, :, :3]
