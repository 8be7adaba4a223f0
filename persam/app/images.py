"""The pictures the page shows: JPEG and PNG encoding, shrinking to a side, masks as data URLs,
safe upload names, and the megapixel check made from an image's header before it is decoded."""

from __future__ import annotations

import base64
import re
import warnings
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

from persam.errors import InputError


def safe_name(filename: Optional[str], default: str = "image") -> str:
    """A file name safe to write: no folders, plain characters, at most 100 of them."""
    name = Path(str(filename or "").replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(" .")
    return (name or default)[-100:]


def jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB picture
        raise RuntimeError("cannot encode a JPEG")
    return buffer.tobytes()


def png(picture: np.ndarray) -> bytes:
    if picture.ndim == 3 and picture.shape[2] == 3:
        picture = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    elif picture.ndim == 3 and picture.shape[2] == 4:
        picture = cv2.cvtColor(picture, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(".png", picture)
    if not ok:  # pragma: no cover
        raise RuntimeError("cannot encode a PNG")
    return buffer.tobytes()


def fit(width: int, height: int, side: int) -> Tuple[float, int, int]:
    """Scale (at most 1) and size that fit width x height into side x side."""
    scale = min(1.0, side / max(width, height))
    return scale, max(1, round(width * scale)), max(1, round(height * scale))


def shrink(image: np.ndarray, side: int) -> Tuple[np.ndarray, float]:
    height, width = image.shape[:2]
    scale, w, h = fit(width, height, side)
    if scale == 1.0:
        return image, 1.0
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), scale


def shrink_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """An H x W bool mask at `size` (width, height)."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def mask_data_url(mask: np.ndarray, size: Tuple[int, int]) -> str:
    """The mask at `size` as a translucent blue PNG with a solid outline (a data URL for the page)."""
    small = shrink_mask(mask, size)
    rgba = np.zeros((*small.shape, 4), np.uint8)
    rgba[small] = (30, 144, 255, 110)
    contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgba, contours, -1, (255, 255, 255, 255), max(1, round(max(size) / 400)))
    return "data:image/png;base64," + base64.b64encode(png(rgba)).decode("ascii")


def check_pixels(path: Path, name: str, limit_megapixels: float) -> None:
    """InputError when the image at `path` is over `limit_megapixels`, from its header alone
    (Pillow's lazy open reads the size, not the pixels).  A file Pillow cannot open passes:
    loading it fails later with the loader's own message (and decodes nothing)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the app's
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the image is far too large (over {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} "
                         f"megapixels; the app accepts at most {limit_megapixels:g})") from None
    except Exception:  # not an image: the loader says so in its words
        return
    if width * height > limit_megapixels * 1e6:
        raise InputError(f"{name}: the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), larger than "
                         f"the app's limit of {limit_megapixels:g} megapixels; downscale it first")
