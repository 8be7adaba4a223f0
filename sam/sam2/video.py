"""A streaming SAM 2.1 video tracker: frames come one at a time and any length of video fits in memory.

Meta's video predictor decodes and keeps every frame of the video before it starts. Here each frame is
given, encoded, used for every object and dropped; each object keeps only its memory bank (its
conditioning frames, the last ``num_maskmem - 1`` frames' memories and the last 15 frames' object
pointers). With the same weights, frames and first-frame mask, the masks equal those of Meta's
``SAM2VideoPredictor`` (``init_state`` on the frames, ``add_new_mask``, ``propagate_in_video``) with its
hole filling off; pass ``video_length`` when the video's frame count is known, as Meta's predictor uses it
to size the object-pointer window of short videos.

Frames are resized the way Meta's loader does it (a square of the model's input size, with PIL), so the
same pixels reach the encoder. Positions in the memory count the frames given to the tracker: with every
K-th frame of a video, each given frame is one step, as Meta's predictor on a folder of those frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam.precision import autocast_context
from sam.sam2.holes import fill_small_holes
from sam.sam2.model import Sam2Model
from sam.sam2.tracker import MemoryBank, Sam2Tracker, TrackerSettings

__all__ = ["FrameResult", "VideoTracker", "prepare_video_frame", "IMAGE_MEAN", "IMAGE_STD"]

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class VideoInputError(ValueError):
    """A frame or mask the tracker cannot use (wrong shape, type or order)."""


def prepare_video_frame(frame_rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised (1, 3, S, S) float32, resized with PIL as Meta's frame loader does."""
    if not isinstance(frame_rgb, np.ndarray) or frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
        raise VideoInputError("a video frame must be an RGB uint8 array of shape (H, W, 3)")
    resized = np.array(Image.fromarray(frame_rgb).resize((image_size, image_size))) / 255.0
    image = torch.from_numpy(resized).permute(2, 0, 1).float()
    image -= torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    image /= torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return image.unsqueeze(0)


@dataclass
class FrameResult:
    """One object on one frame: mask logits at the video's size (H, W) float32, the object-score logit
    (> 0: the model sees the object) and the frame's index as given."""

    frame_index: int
    mask_logits: np.ndarray
    object_score: float

    @property
    def mask(self) -> np.ndarray:
        return self.mask_logits > 0

    @property
    def present(self) -> bool:
        return self.object_score > 0


class VideoTracker:
    """Follows objects through a stream of frames with SAM 2.1's memory.

    ``step(frame_index, frame, masks)`` takes one RGB uint8 frame (H, W, 3) and, for objects given a mask
    on it (boolean (H, W), keyed by object id), makes it one of their conditioning frames; every other
    started object is tracked. It returns a FrameResult per object. ``start`` / ``add_mask`` / ``track``
    are the same for one frame. ``fill_hole_area`` fills background islands of at most that many
    low-resolution pixels, on every device (Meta's post-processing, which its CPU installs skip; None takes
    the model config's, 8 as Meta's builder sets it; 0 turns it off, as for the parity with Meta's CPU runs).
    ``precision`` "bf16" runs every step under bfloat16 autocast: on a CPU with native bf16 (AMX) about
    twice as fast, with masks close to fp32's but not equal (fp32, the default, gives Meta's).
    ``max_conditioning_frames`` bounds the conditioning frames attended to and kept per object, so that
    objects re-seeded again and again stay in bounded memory: the most recent ones are kept (Meta's
    predictor keeps and attends to all; the outputs are the same while an object has at most that many).
    The model must already be on ``device``.
    """

    def __init__(self, model: Sam2Model, device: str | torch.device = "cpu", video_length: Optional[int] = None,
                 fill_hole_area: Optional[int] = None, max_conditioning_frames: Optional[int] = 16,
                 precision: str = "fp32") -> None:
        self.tracker = Sam2Tracker(model, TrackerSettings.of_model(model, max_conditioning_frames))
        self.device = torch.device(device)
        autocast_context(self.device, precision)  # validates the mode for this device
        self.precision = precision
        self.video_length = video_length
        if fill_hole_area is None:
            fill_hole_area = model.config.fill_hole_area
        self.fill_hole_area = fill_hole_area
        self.fill_holes = partial(fill_small_holes, max_area=fill_hole_area) if fill_hole_area > 0 else None
        self.banks: Dict[int, MemoryBank] = {}
        self.next_position = 0
        self.last_frame_index: Optional[int] = None

    @property
    def object_ids(self) -> List[int]:
        return list(self.banks)

    def start(self, frame: np.ndarray, mask: np.ndarray, object_id: int = 1, frame_index: int = 0) -> FrameResult:
        """The first frame and one object's mask on it."""
        return self.step(frame_index, frame, {object_id: mask})[object_id]

    def add_mask(self, frame_index: int, frame: np.ndarray, mask: np.ndarray, object_id: int = 1) -> Dict[int, FrameResult]:
        """A new frame on which `object_id` (new, or re-seeded) is given by its mask; others are tracked."""
        return self.step(frame_index, frame, {object_id: mask})

    def track(self, frame_index: int, frame: np.ndarray) -> Dict[int, FrameResult]:
        """A new frame: every started object tracked."""
        return self.step(frame_index, frame)

    @torch.inference_mode()
    def step(self, frame_index: int, frame: np.ndarray, masks: Optional[Mapping[int, np.ndarray]] = None) -> Dict[int, FrameResult]:
        masks = dict(masks or {})
        if self.last_frame_index is not None and frame_index <= self.last_frame_index:
            raise VideoInputError(f"frame {frame_index} comes after frame {self.last_frame_index}: frames must be in order")
        if not masks and not self.banks:
            raise VideoInputError("the first frame given to the tracker needs an object's mask")
        image = prepare_video_frame(frame, self.tracker.image_size).to(self.device)
        height, width = frame.shape[:2]
        model_masks = {object_id: self._mask_input(mask, height, width, object_id) for object_id, mask in masks.items()}
        with autocast_context(self.device, self.precision):
            results = self._objects_step(image, frame_index, height, width, model_masks)
        self.next_position += 1
        self.last_frame_index = frame_index
        return results

    def _objects_step(self, image: torch.Tensor, frame_index: int, height: int, width: int,
                      model_masks: Dict[int, torch.Tensor]) -> Dict[int, FrameResult]:
        """One frame encoded once, then every object: started from its mask, or tracked with its memory."""
        features = self.tracker.encode_image(image)
        position = self.next_position
        results = {}
        for object_id in list(self.banks) + [i for i in model_masks if i not in self.banks]:
            bank = self.banks.setdefault(object_id, MemoryBank())
            if object_id in model_masks:
                output = self.tracker.mask_step(features, model_masks[object_id], fill_holes=self.fill_holes)
            else:
                output = self.tracker.track_step(features, position, bank, self.video_length, fill_holes=self.fill_holes)
            bank.add(position, output.memory, conditioning=object_id in model_masks)
            bank.forget_before(position + 1, self.tracker.num_maskmem, self.tracker.settings)
            logits = F.interpolate(output.low_res_logits, size=(height, width), mode="bilinear", align_corners=False)
            results[object_id] = FrameResult(frame_index, logits[0, 0].float().cpu().numpy(), float(output.object_score.item()))
        return results

    def _mask_input(self, mask: np.ndarray, height: int, width: int, object_id: int) -> torch.Tensor:
        """A boolean (H, W) mask -> (1, 1, S, S) binary float at the model's input size (Meta's add_new_mask)."""
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            size = f"{mask.shape[1]} x {mask.shape[0]}" if mask.ndim == 2 else f"of shape {mask.shape}"
            raise VideoInputError(f"object {object_id}: its mask is {size} but the frame is {width} x {height}")
        tensor = torch.from_numpy(mask.astype(bool)).float()[None, None].to(self.device)
        side = self.tracker.image_size
        if (height, width) != (side, side):
            tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            tensor = (tensor >= 0.5).float()
        return tensor

    def held_tensors(self) -> List[torch.Tensor]:
        """Every tensor the tracker keeps between frames (the memory banks)."""
        return [tensor for bank in self.banks.values() for tensor in bank.tensors()]
