"""GF-SAM on video, per frame: the frame step of ``persam track --method gfsam``.

GF-SAM (persam.method.gfsam) finds every instance of one category in a photo; it has no memory and
no prompt from the frame before. So :class:`GFSAMFrameTracker` segments each frame on its own with
the concept (no box carried over from the previous frame, unlike PerSAM's
persam.method.video.VideoTracker), and reports the frame as that tracker does: a
:class:`persam.method.video.FrameResult` with one object (id 1), the union of the kept instances.
Its object result adds GF-SAM's score and the number of instances found.

The tracker has the VideoTracker's interface (``track``, ``restart``), so that persam.runs.track's
frame loop drives it unchanged; ``restart`` does nothing (nothing is carried between frames, so
resuming an interrupted run gives the masks of an uninterrupted one by construction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from persam.method.gfsam import GFSAM, GFSAMConcept
from persam.method.refine import mask_box
from persam.method.video import FrameResult, ObjectResult

__all__ = ["GFSAMFrameTracker", "GFSAMObjectResult", "OBJECT_ID"]

OBJECT_ID = 1  # GF-SAM's one category: object 1 of the frame's label map


@dataclass
class GFSAMObjectResult(ObjectResult):
    """The category in one frame: ObjectResult (its peak_similarity and iou_score both GF-SAM's score,
    as in `persam segment --method gfsam`: GF-SAM predicts no IoU), with the score and the number of
    kept instances (None on a reference frame, whose mask is given)."""

    score: Optional[float] = None
    instances: Optional[int] = None


class GFSAMFrameTracker:
    """GF-SAM on each frame on its own (see the module doc).

        tracker = GFSAMFrameTracker(GFSAM(predictor, dinov2, settings), concept)
        for frame in frames:
            result = tracker.track(frame)   # FrameResult: label map (0 / 1), object 1's found / score / box

    `gfsam`'s settings (their ``min_similarity``: below it a frame is "not found") are used as they
    are; the concept is checked against its DINOv2 model here (InputError).
    """

    def __init__(self, gfsam: GFSAM, concept: GFSAMConcept) -> None:
        gfsam.check_concept(concept)
        self.gfsam = gfsam
        self.concept = concept
        self.ids = [OBJECT_ID]
        self.shape: Optional[tuple] = None  # H x W of the frames, from the first one seen

    def restart(self, previous) -> None:
        """Nothing is carried from frame to frame: the previous frame (label map or masks) is not used."""

    def track(self, frame: np.ndarray) -> FrameResult:
        """GF-SAM on `frame` (RGB uint8 H x W x 3): object 1 is the union of the kept instances."""
        frame = np.asarray(frame)
        if self.shape is None:
            self.shape = frame.shape[:2]
        elif frame.shape[:2] != self.shape:
            shape = self.shape
            raise ValueError(f"frame size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's "
                             f"{shape[1]}x{shape[0]}")
        start = time.perf_counter()
        found = self.gfsam.segment(frame, self.concept)
        label_map = np.asarray(found.mask, dtype=bool).astype(np.int32) * OBJECT_ID
        box = mask_box(label_map == OBJECT_ID)
        score = float(found.score)
        result = GFSAMObjectResult(found=box is not None, peak_similarity=score, iou_score=score, box=box,
                                   score=score, instances=len(found.instances) if found.found else 0)
        # GF-SAM encodes the frame (DINOv2 and SAM) inside its one step: all of it is segment_s
        return FrameResult(label_map, {OBJECT_ID: result}, False, 0.0, time.perf_counter() - start)

    @staticmethod
    def reference_result(mask: np.ndarray) -> FrameResult:
        """The reference frame's result: its given mask as object 1 (not predicted)."""
        mask = np.asarray(mask, dtype=bool)
        label_map = mask.astype(np.int32) * OBJECT_ID
        box = mask_box(mask)
        result = GFSAMObjectResult(found=box is not None, peak_similarity=None, iou_score=None, box=box)
        return FrameResult(label_map, {OBJECT_ID: result}, True)
