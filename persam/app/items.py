"""What a session keeps of each image: a reference (its preview, prompts and mask) or a target
(its thumbnail and last result, with the :class:`Drawing` its overlays are drawn from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

from persam.app.images import shrink_mask


@dataclass
class Item:
    """An image of the session: a reference or a target."""

    id: str
    name: str  # the user's file name (or the path, for a folder target)
    path: Path  # where the pixels are read from
    width: Optional[int] = None
    height: Optional[int] = None
    key: Optional[str] = None  # pixels_key, once the image was read
    uploaded: bool = True  # False: a file in a folder on the server (read where it is)
    sha256: Optional[str] = None  # of the file (uploads: when stored; folder files: when first segmented)

    def info(self) -> dict:
        return {"id": self.id, "name": self.name, "width": self.width, "height": self.height}


@dataclass
class Reference(Item):
    preview: bytes = b""  # JPEG, longest side at most PREVIEW_SIDE
    preview_size: Tuple[int, int] = (0, 0)  # width, height
    points: List[Tuple[float, float, int]] = field(default_factory=list)  # x, y, label
    box: Optional[Tuple[float, float, float, float]] = None
    mask: Optional[np.ndarray] = None  # H x W bool
    mask_source: Optional[str] = None  # "clicks", "box" or "file"
    mask_png: str = ""  # data URL of the mask at preview size
    version: int = 0  # changes with the mask

    def info(self) -> dict:
        out = super().info()
        out.update(
            preview=f"/api/references/{self.id}/image.jpg", preview_width=self.preview_size[0],
            preview_height=self.preview_size[1], points=[list(p) for p in self.points],
            box=list(self.box) if self.box else None, mask_source=self.mask_source,
            mask=self.mask_png or None, area=int(self.mask.sum()) if self.mask is not None else 0,
        )
        return out


@dataclass
class Drawing:
    """What the overlay of a target's last result shows, at the image's full size: its masks
    (PNG bytes, a few kB each, not H x W arrays kept for every target), prompt points and boxes."""

    masks: List[bytes]
    points: np.ndarray  # N x 2
    labels: np.ndarray  # N
    boxes: np.ndarray  # M x 4

    def picture(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The overlay over `image` (the target scaled by `scale`)."""
        from persam.data import visualize

        size = (image.shape[1], image.shape[0])
        masks = [shrink_mask(cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_GRAYSCALE) > 0, size)
                 for m in self.masks]
        return visualize.overlay(image, masks, self.points * scale if len(self.points) else None,
                                 self.labels if len(self.labels) else None,
                                 self.boxes * scale if len(self.boxes) else None)


@dataclass
class Target(Item):
    thumb: bytes = b""  # JPEG, THUMB_SIDE
    result: Optional[dict] = None
    overlay: bytes = b""  # JPEG of the last result, GALLERY_SIDE
    drawing: Optional[Drawing] = None  # the last result, for the full-size overlay
    version: int = 0

    def info(self) -> dict:
        out = super().info()
        out.update(thumb=f"/api/targets/{self.id}/thumb.jpg" if self.thumb else None, result=self.result)
        return out
