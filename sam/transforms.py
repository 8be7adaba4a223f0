"""Geometry between an original image and SAM's square input frame.

The one place where images and masks are resized to the input frame, where
prompt coordinates are scaled into it, and where low-resolution logits are
brought back to the original size. Everything here works on tensors on any
device.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def preprocess_shape(height: int, width: int, long_side: int = 1024) -> Tuple[int, int]:
    """Size (h, w) of an image resized so that its longest side is `long_side`."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: torch.Tensor, long_side: int = 1024, round_to_uint8: bool = True) -> torch.Tensor:
    """Resize C x H x W (or B x C x H x W) so the longest side is `long_side`.

    Bilinear with antialiasing, one axis at a time (width first), like
    Pillow's BILINEAR resize that SAM's ResizeLongestSide uses. With
    `round_to_uint8` the result of each pass is rounded to integer levels as
    Pillow does for 8-bit images (agrees with Pillow within one level); set it
    to False for masks and other real-valued maps. Returns float32.
    """
    squeeze = image.dim() == 3
    x = image[None] if squeeze else image
    x = x.to(torch.float32)
    height, width = x.shape[-2:]
    new_h, new_w = preprocess_shape(height, width, long_side)
    for size in ((height, new_w), (new_h, new_w)):
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            if round_to_uint8:
                x = x.round().clamp(0, 255)
    return x[0] if squeeze else x


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
