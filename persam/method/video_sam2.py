"""SAM 2.1 following the user's objects, with PerSAM's concept to find them and to find them again.

SAM 2 (sam.sam2.video.VideoTracker) follows an object once it has its mask on one frame, with its memory
of the frames before. A PerSAM / PerSAM-F concept (persam.method.pipeline) says where the object is on a
frame of its own. :class:`ConceptVideoTracker` joins the two, one processed frame at a time:

* an object given by its mask on a frame (``seeds``) starts there, or is re-seeded there;
* an object not started yet (a concept, a reference photo from elsewhere, frames before the reference
  frame) is looked for by its concept on each frame until the concept finds it (peak similarity at least
  ``min_similarity`` and a non-empty mask); SAM 2 starts from that mask;
* when SAM 2's object score says the object is gone (logit <= 0, or an empty mask), tracking goes on; after
  ``redetect_after`` processed frames in a row without it, the concept looks for it on each processed frame
  and SAM 2 is re-seeded (a new conditioning frame) where it is found.  ``redetect_after`` None: never.

The concept is run only on frames where some object is looked for, so a video where SAM 2 keeps its
objects costs SAM 2 alone.  Objects are merged as Meta's DAVIS inference writes them: a pixel goes to the
lowest object id whose mask has it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from sam.predictor import SamPredictor
from sam.sam2.video import VideoTracker

from persam.method.pipeline import Concept, Segmentation, segment
from persam.method.refine import mask_box

__all__ = ["ConceptFinder", "ConceptVideoTracker", "ObjectTrack", "TrackedFrame", "merge_lowest_id_first"]

SOURCES = ("reference", "found", "tracked", "waiting")


class ConceptFinder:
    """PerSAM concepts ({object id: Concept}) looking for their objects in a frame with SAM (v1): the frame
    is encoded once for all the objects looked for; an object is found where its peak similarity is at
    least `min_similarity` and its mask is not empty."""

    def __init__(self, predictor: SamPredictor, concepts: Mapping[int, Concept], min_similarity: float) -> None:
        self.predictor = predictor
        self.concepts = dict(concepts)
        self.min_similarity = float(min_similarity)

    def find(self, frame: np.ndarray, object_ids: Sequence[int]) -> Dict[int, Segmentation]:
        """Each object of `object_ids` (that has a concept) in `frame` (RGB uint8 H x W x 3)."""
        wanted = [i for i in object_ids if i in self.concepts]
        if not wanted:
            return {}
        self.predictor.set_image(frame)
        return {i: segment(self.predictor, self.concepts[i], None, self.min_similarity) for i in wanted}


@dataclass
class ObjectTrack:
    """One object on one frame.  `source`: "reference" (its given mask), "found" (the concept found it and
    SAM 2 was seeded there), "tracked" (SAM 2's memory) or "waiting" (not started: the concept has not
    found it yet).  `object_score`: SAM 2's object-score logit (None while waiting); `peak_similarity`:
    the concept's, on frames where it looked."""

    found: bool
    source: str
    object_score: Optional[float] = None
    peak_similarity: Optional[float] = None
    box: Optional[np.ndarray] = None


@dataclass
class TrackedFrame:
    """One processed frame: the label map (H x W int32, 0 background), every object's track, the seconds
    spent on SAM 2 (encoding included) and on the concept."""

    label_map: np.ndarray
    objects: Dict[int, ObjectTrack]
    sam2_s: float = 0.0
    concept_s: float = 0.0


def merge_lowest_id_first(shape, masks: Mapping[int, np.ndarray]) -> np.ndarray:
    """{id: H x W bool} -> H x W int32 label map; where masks overlap the lowest id wins (Meta's DAVIS writer)."""
    label_map = np.zeros(shape, dtype=np.int32)
    for object_id in sorted(masks, reverse=True):
        label_map[np.asarray(masks[object_id], dtype=bool)] = object_id
    return label_map


class ConceptVideoTracker:
    """SAM 2.1's video tracker with a concept that finds objects and finds them again (see the module doc).

        tracker = ConceptVideoTracker(VideoTracker(model), [1], finder_factory, redetect_after=10)
        frame = tracker.step(index, rgb, seeds={1: mask})   # a TrackedFrame; later frames: tracker.step(index, rgb)

    `finder_factory` builds the ConceptFinder the first time one is needed (None: no concept; objects
    are then started only by seeds and never looked for again).
    """

    def __init__(self, video: VideoTracker, object_ids: Sequence[int],
                 finder_factory: Optional[Callable[[], ConceptFinder]] = None,
                 redetect_after: Optional[int] = None) -> None:
        if not object_ids:
            raise ValueError("ConceptVideoTracker needs at least one object id")
        if redetect_after is not None and redetect_after < 1:
            raise ValueError(f"redetect_after must be at least 1 (or None: never), got {redetect_after}")
        self.video = video
        self.ids: List[int] = sorted(int(i) for i in object_ids)
        self.finder_factory = finder_factory
        self.finder: Optional[ConceptFinder] = None
        self.redetect_after = redetect_after
        self.lost: Dict[int, int] = {i: 0 for i in self.ids}  # processed frames in a row without the object

    def started(self, object_id: int) -> bool:
        return object_id in self.video.banks

    def looked_for(self, seeds: Mapping[int, np.ndarray]) -> List[int]:
        """The objects the concept looks for on the next frame (when there is a concept)."""
        if self.finder_factory is None:
            return []
        wanted = []
        for i in self.ids:
            if i in seeds:
                continue
            if not self.started(i):
                wanted.append(i)
            elif self.redetect_after is not None and self.lost[i] >= self.redetect_after:
                wanted.append(i)
        return wanted

    def step(self, frame_index: int, frame: np.ndarray,
             seeds: Optional[Mapping[int, np.ndarray]] = None) -> TrackedFrame:
        """One processed frame (RGB uint8 H x W x 3, frame indices increasing); `seeds`: {id: bool mask}."""
        seeds = {int(i): np.asarray(m, dtype=bool) for i, m in (seeds or {}).items()}
        unknown = sorted(set(seeds) - set(self.ids))
        if unknown:
            raise ValueError(f"object id {unknown[0]} is not one of the tracker's ({self.ids})")
        sources = {i: "reference" for i in seeds}
        peaks: Dict[int, float] = {}
        concept_s = 0.0
        wanted = self.looked_for(seeds)
        if wanted:
            start = time.perf_counter()
            if self.finder is None:
                self.finder = self.finder_factory()
            for i, found in self.finder.find(frame, wanted).items():
                peaks[i] = float(found.peak_similarity)
                if found.found and np.any(found.mask):
                    seeds[i] = np.asarray(found.mask, dtype=bool)
                    sources[i] = "found"
            concept_s = time.perf_counter() - start
        start = time.perf_counter()
        results = self.video.step(frame_index, frame, seeds) if (seeds or self.video.banks) else {}
        sam2_s = time.perf_counter() - start
        masks, objects = {}, {}
        for i in self.ids:
            result = results.get(i)
            if result is None:
                objects[i] = ObjectTrack(False, "waiting", None, peaks.get(i), None)
                continue
            mask = result.mask
            found = bool(result.present and mask.any())
            if found:
                masks[i] = mask
            self.lost[i] = 0 if found else self.lost[i] + 1
            objects[i] = ObjectTrack(found, sources.get(i, "tracked"), float(result.object_score), peaks.get(i))
        label_map = merge_lowest_id_first(frame.shape[:2], masks)
        for i, track in objects.items():
            track.box = mask_box(label_map == i) if track.found else None
            track.found = track.box is not None
        return TrackedFrame(label_map, objects, sam2_s, concept_s)
