"""``persam track --method gfsam``: GF-SAM on each frame, in the frame loop of persam.runs.track.

:class:`GFSAMFrameLoop` is persam.runs.track's loop (frames done earlier replayed from their masks,
the overlay, results.json, resume) with GF-SAM's frame step (persam.method.video_gfsam) in place of
PerSAM's tracker: every processed frame is segmented by GF-SAM on its own, with no box or mask carried
over from the frame before, and object 1 is the union of the kept instances.  Its
`predictor_factory` builds ``(SamPredictor, DINOv2)``.  The concept is the reference's (a concept
learned with ``persam learn --method gfsam``), or learned here from the reference mask on a frame of
the video or on an image (SAM makes that mask from clicks / a box first, as for PerSAM).  The
reference frame's output is the reference mask itself, as with PerSAM.

Each frame's record in results.json is PerSAM's (found, peak_similarity, iou_score, box, area) with
GF-SAM's ``score`` (also in peak_similarity and iou_score: GF-SAM predicts no IoU) and ``instances``,
the number of instances kept; ``encode_s`` is null: GF-SAM encodes the frame with DINOv2 and SAM
inside its one step, all of it in ``time_s``.  One object only: GF-SAM finds every instance of one
category (several objects are refused, SettingError naming ``ref_labels``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from persam.errors import SettingError
from persam.method.gfsam import GFSAM, GFSAMSettings
from persam.method.video_gfsam import GFSAMFrameTracker
from persam.runs.track import _FrameLoop, _record, reference_mask_by_sam

__all__ = ["GFSAMFrameLoop", "check_one_category"]


def check_one_category(reference) -> None:
    """SettingError for a reference of several objects: GF-SAM finds the instances of one category."""
    if reference.labels or len(reference.ids) > 1:
        raise SettingError("{ref_labels}: GF-SAM finds every instance of ONE category (object 1 is their union); "
                           "give the category's mask with {ref_mask}, or track several objects with PerSAM",
                           "ref_labels", "ref_mask")


class GFSAMFrameLoop(_FrameLoop):
    """persam.runs.track's frame loop with GF-SAM on each frame (see the module doc).

    `settings`: GF-SAM's (their min_similarity is replaced by the run's --min-similarity);
    `dinov2_sha256`: the DINOv2 checkpoint's, recorded in a concept learned here and checked against a
    given concept's."""

    def __init__(self, folder, reference, options, names, writer, predictor_factory, log,
                 settings: GFSAMSettings = GFSAMSettings(), dinov2_sha256: Optional[str] = None) -> None:
        check_one_category(reference)
        super().__init__(folder, reference, options, names, writer, predictor_factory, log)
        self.settings = replace(settings, min_similarity=options.min_similarity)
        self.dinov2_sha256 = dinov2_sha256

    def _make_tracker(self, models):
        predictor, dinov2 = models
        gfsam = GFSAM(predictor, dinov2, self.settings, dinov2_sha256=self.dinov2_sha256)
        reference = self.reference
        if reference.kind == "concept":
            return GFSAMFrameTracker(gfsam, reference.concept), None
        if reference.masks is None:  # SAM makes the mask from the clicks / the box
            reference_mask_by_sam(predictor, reference, self.folder.out_dir, self.log)
        mask = reference.masks[1]
        tracker = GFSAMFrameTracker(gfsam, gfsam.learn(reference.image, mask))
        first = GFSAMFrameTracker.reference_result(mask) if reference.kind == "frame" else None
        return tracker, first

    def _frame_record(self, index: int, result) -> dict:
        record = _record(index, self.names[index], result, self.reference.ids)
        if not result.reference:
            record["encode_s"] = None  # inside time_s: GF-SAM's one step encodes the frame
        for entry in record["objects"]:
            found = result.objects[entry["id"]]
            entry["score"] = None if found.score is None else round(float(found.score), 5)
            entry["instances"] = found.instances
        return record
