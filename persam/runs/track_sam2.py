"""``persam track --tracker sam2``: the frame loop of a run whose objects SAM 2.1 follows.

The run itself (output folder, key, resume, overlay video, results.json, coco.json) is
persam.runs.track's; :class:`Sam2FrameLoop` replaces its per-frame work with
persam.method.video_sam2's :class:`ConceptVideoTracker`: SAM 2.1 follows the objects from their mask,
and a PerSAM concept finds them where they have no mask yet and finds them again after SAM 2 lost them
for ``redetect_after`` processed frames.  Where the concept comes from:

* ``--concept``: the concept file (its SAM model finds the object on the first frame where it is present);
* a mask / label map on a frame: learned from that frame and mask when SAM's checkpoint is there (else
  no re-detection, said in one line); clicks or a box: SAM (v1) makes the mask first, as for PerSAM;
* a reference photo from elsewhere: learned there; SAM 2 starts where the concept first finds the object.

The reference frame is given to SAM 2 in its order with its masks (SAM 2 outputs them there as Meta's
predictor does, a mask prompt's low-resolution version); when it is not a processed frame (``--every``,
``--start`` after it) it is still given, before the first processed frame after it, and not written.

Resume: SAM 2's memory is the frames before, so a resumed run gives the frames done earlier to SAM 2 again
(their masks are not rewritten) and goes on from the first missing frame: the masks are those of an
uninterrupted run, at the cost of re-running the done frames through the model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from tqdm import tqdm

from persam.data.io import atomic_save_png
from persam.data.video_writer import overlay_frame
from persam.errors import SettingError
from persam.runs.records import REFERENCE_MASK_FILE
from persam.runs.track import BAR_FORMAT, _FrameLoop, _save_mask

__all__ = ["DEFAULT_REDETECT_AFTER", "DEFAULT_SAM2_MIN_SIMILARITY", "DEFAULT_SAM2_MODEL", "Sam2FrameLoop",
           "Sam2TrackModels", "Sam2TrackSettings"]

DEFAULT_SAM2_MODEL = "sam2.1_hiera_t"
DEFAULT_REDETECT_AFTER = 10  # processed frames without the object before the concept looks for it again
DEFAULT_SAM2_MIN_SIMILARITY = 0.6  # the concept's peak similarity where it finds the object (README's example)


@dataclass
class Sam2TrackModels:
    """What a SAM 2 run builds at its first frame: SAM 2.1 on `device`, and a builder of SAM (v1)'s
    predictor for the concept (None: no SAM checkpoint; only a mask on a frame then works)."""

    model: object  # sam.sam2.model.Sam2Model
    device: str
    sam_predictor: Optional[Callable[[], object]] = None
    precision: str = "fp32"  # SAM 2.1's steps: "bf16" under autocast (sam.sam2.video.VideoTracker)


@dataclass
class Sam2TrackSettings:
    """redetect_after: processed frames without an object before the concept looks for it again (None:
    never); min_similarity: the concept's peak similarity where it finds an object; fill_hole_area: holes
    of at most that many low-resolution pixels filled in SAM 2's masks (None: the model's 8; 0: off)."""

    redetect_after: Optional[int] = DEFAULT_REDETECT_AFTER
    min_similarity: float = DEFAULT_SAM2_MIN_SIMILARITY
    fill_hole_area: Optional[int] = None


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 5)


def _record(index: int, name: str, tracked, ids: Sequence[int], reference: bool) -> dict:
    objects = []
    for i in ids:
        o = tracked.objects[i]
        objects.append({
            "id": int(i), "found": bool(o.found), "source": o.source, "object_score": _rounded(o.object_score),
            "peak_similarity": _rounded(o.peak_similarity), "iou_score": None,
            "box": None if o.box is None else [round(float(v), 2) for v in o.box],
            "area": int(np.count_nonzero(tracked.label_map == i)),
        })
    return {"index": int(index), "mask": name, "reference": bool(reference), "objects": objects,
            "encode_s": round(float(tracked.sam2_s), 4), "time_s": round(float(tracked.sam2_s + tracked.concept_s), 4)}


class Sam2FrameLoop(_FrameLoop):
    """persam.runs.track's frame loop with SAM 2.1 doing the per-frame work (see the module doc).
    `predictor_factory` returns a :class:`Sam2TrackModels`."""

    def __init__(self, folder, reference, options, names: Dict[int, str], writer, predictor_factory, log,
                 settings: Optional[Sam2TrackSettings] = None) -> None:
        super().__init__(folder, reference, options, names, writer, predictor_factory, log)
        self.settings = settings or Sam2TrackSettings()
        self.video_length: Optional[int] = None
        self.replay_through_model = False
        self.reference_given = False
        self.models: Optional[Sam2TrackModels] = None
        self.sam = None  # SAM (v1)'s predictor, once built

    def run(self, source, plan, done_before: int) -> dict:
        self.video_length = len(plan)  # Meta's predictor sizes its object-pointer window of short videos by it
        self.replay_through_model = done_before < len(plan)  # SAM 2's memory needs the done frames again
        return super().run(source, plan, done_before)

    def _replay(self, index: int, frame: np.ndarray) -> None:
        super()._replay(index, frame)
        if self.replay_through_model:
            if self.tracker is None:
                self._build()
            self._step(index, frame)

    def _segment(self, index: int, frame: np.ndarray, position: int, total: int) -> None:
        if self.tracker is None:
            self._build()
        if self.bar is None:
            self.run_start = time.perf_counter()
            progress = self.options.progress
            self.bar = tqdm(total=total, initial=position, desc="tracking", unit=" frames", file=sys.stderr,
                            bar_format=BAR_FORMAT, disable=(not progress) if progress is not None else None)
        reference = self.reference
        is_reference = reference.kind == "frame" and index == reference.frame
        tracked = self._step(index, frame)
        _save_mask(self.folder.out_dir / self.names[index], tracked.label_map, reference.labels)
        self.folder.records[index] = _record(index, self.names[index], tracked, reference.ids, is_reference)
        found = {i: o.found for i, o in tracked.objects.items()}
        self.writer.write(overlay_frame(frame, tracked.label_map, reference.ids, found, is_reference))
        self.written.append(index)
        self.run_frames += 1
        self.bar.update(1)

    # ----------------------------------------------------------------------------------------
    def _sam_predictor(self):
        if self.sam is None:
            if self.models.sam_predictor is None:
                raise SettingError("this reference needs SAM (v1) to make its mask or concept, and no SAM checkpoint "
                                   "is there: run `persam download` for it or pass {sam_checkpoint}", "sam_checkpoint")
            self.sam = self.models.sam_predictor()
        return self.sam

    def _build(self) -> None:
        from sam.sam2.video import VideoTracker

        from persam.method.video_sam2 import ConceptVideoTracker

        self.models = self.predictor_factory()
        reference = self.reference
        if reference.kind != "concept" and reference.masks is None:
            self._mask_from_prompts()
        video = VideoTracker(self.models.model, self.models.device, video_length=self.video_length,
                             fill_hole_area=self.settings.fill_hole_area, precision=self.models.precision)
        finder_factory = self._finder_factory()
        if finder_factory is None and reference.kind != "frame":
            raise SettingError("a concept or a reference image needs SAM (v1) to find the object: pass "
                               "{sam_checkpoint} or download the concept's model", "sam_checkpoint")
        self.tracker = ConceptVideoTracker(video, reference.ids, finder_factory, self.settings.redetect_after)

    def _mask_from_prompts(self) -> None:
        """Clicks / a box: SAM (v1) makes object 1's mask on the reference frame or image, as for PerSAM."""
        from persam.method.target import reference_mask_from_prompts

        reference = self.reference
        predictor = self._sam_predictor()
        predictor.set_image(reference.image)
        mask = reference_mask_from_prompts(predictor, points=reference.points, box=reference.box)
        if mask is None:
            where = f"frame {reference.frame}" if reference.kind == "frame" else "the reference image"
            raise SettingError(f"{where}: SAM found no object at the given {'box' if reference.box else 'points'}; "
                               f"give {{ref_mask}} instead", "ref_mask")
        atomic_save_png(self.folder.out_dir / REFERENCE_MASK_FILE, np.asarray(mask, dtype=bool))
        self.log(f"reference mask made by SAM: {Path(self.folder.out_dir) / REFERENCE_MASK_FILE}")
        reference.masks = {1: np.asarray(mask, dtype=bool)}

    def _finder_factory(self):
        """What builds the ConceptFinder when first needed; None where there is no SAM (v1) for it."""
        from persam.method.video import learn_concepts
        from persam.method.video_sam2 import ConceptFinder

        if self.models.sam_predictor is None:
            return None
        reference, options, threshold = self.reference, self.options, self.settings.min_similarity

        def build() -> ConceptFinder:
            predictor = self._sam_predictor()
            if reference.kind == "concept":
                concepts = {1: reference.concept}
            else:
                concepts = learn_concepts(predictor, reference.image, reference.masks, options.method, options.finetune)
            return ConceptFinder(predictor, concepts, threshold)

        return build

    def _step(self, index: int, frame: np.ndarray):
        """One frame through the tracker; the reference frame's masks go to SAM 2 in their order."""
        reference = self.reference
        seeds = None
        if reference.kind == "frame" and not self.reference_given and index >= reference.frame:
            self.reference_given = True
            if index == reference.frame:
                seeds = reference.masks
            else:  # the reference frame is not a processed one: given to SAM 2 first, not written
                self.tracker.step(reference.frame, reference.image, reference.masks)
        return self.tracker.step(index, frame, seeds)
