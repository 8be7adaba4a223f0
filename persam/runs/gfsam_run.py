"""GF-SAM in the engines (`persam segment / apply --method gfsam`, local and Ray): the work on a
group of targets, as persam.runs.local.segment_targets does it for PerSAM.

GF-SAM needs a second model (DINOv2) beside SAM and encodes each photo itself (SAM and DINOv2
see its 1024-pixel frame: persam.method.gfsam), so a run holds a :class:`GFSAMTask` where PerSAM's
holds a Concept: the learned concept, the method's settings and the loaded DINOv2.  Pickled (the
Ray engine sends it to its workers), it leaves the model out; each worker loads its own
(:meth:`GFSAMTask.with_dinov2`).

Each found instance (a kept component of the point-mask graph) becomes one
:class:`persam.method.pipeline.Segmentation`, so that the records, overlays, label PNGs and COCO of
PerSAM's runs serve unchanged: its mask, the kept prompt points of its component, its tight box,
and GF-SAM's score (the highest positive prior at the kept points; no predicted IoU exists) as
both ``iou_score`` and ``peak_similarity``.  Without ``multi`` the one object is the union of
the kept masks.  On a CPU each image runs alone on one torch thread, as PerSAM's do, so that both
engines write the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from persam.errors import SettingError
from persam.method.gfsam import GFSAMConcept, GFSAMSegmentation, GFSAMSettings, METHOD, segment
from persam.method.gfsam_graph import KEPT
from persam.method.pipeline import Segmentation, decode_workers, each_on_one_thread
from persam.runs.records import ImageResult, RunOptions, Target

__all__ = ["GFSAMTask", "as_segmentations", "segment_gfsam_targets"]


@dataclass
class GFSAMTask:
    """What a GF-SAM run finds and with what: the concept, the settings (its min_similarity is the
    run's) and the DINOv2 (a module with ``patch_features``; None until loaded)."""

    concept: GFSAMConcept
    settings: GFSAMSettings
    dinov2: Any = None
    method: str = METHOD

    def with_dinov2(self, dinov2) -> "GFSAMTask":
        return replace(self, dinov2=dinov2)

    def __getstate__(self) -> dict:  # the model stays behind: a Ray worker loads its own
        return {**self.__dict__, "dinov2": None}


def _box(mask: np.ndarray) -> Optional[np.ndarray]:
    """The tight box (x0, y0, x1, y1) of a mask's pixels, None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def _instance_points(found: GFSAMSegmentation, instance: np.ndarray) -> np.ndarray:
    """The kept prompt points inside an instance's mask (those of its component)."""
    kept = found.points[found.point_labels == KEPT]
    if len(kept) == 0:
        return np.zeros((0, 2), np.float32)
    height, width = instance.shape
    cols = np.clip(kept[:, 0].astype(np.int64), 0, width - 1)
    rows = np.clip(kept[:, 1].astype(np.int64), 0, height - 1)
    return kept[instance[rows, cols]].astype(np.float32)


def as_segmentations(found: GFSAMSegmentation, multi: bool, max_objects: int) -> List[Segmentation]:
    """GF-SAM's answer as PerSAM's objects: one (the union), or with `multi` each instance, the
    `max_objects` largest, largest first.  Not found: one object, not found, empty, with the score."""
    score = float(found.score)

    def one(mask: np.ndarray, points: np.ndarray) -> Segmentation:
        return Segmentation(mask=mask, iou_score=score, peak_similarity=score, found=bool(found.found),
                            points=points, labels=np.ones(len(points), np.int64),
                            box=_box(mask) if found.found else None)

    if not multi or not found.found:
        points = found.points[found.point_labels == KEPT] if found.found else np.zeros((0, 2), np.float32)
        return [one(np.asarray(found.mask, dtype=bool), np.asarray(points, np.float32))]
    instances = sorted(found.instances, key=lambda m: -int(np.count_nonzero(m)))[:max_objects]
    return [one(mask, _instance_points(found, mask)) for mask in instances]


def segment_gfsam_targets(predictor, task: GFSAMTask, targets: Sequence[Target], images: Sequence[np.ndarray],
                          options: RunOptions, timings: Sequence[dict], encode_outputs) -> List[ImageResult]:
    """GF-SAM on loaded targets: each one's record and output files (nothing written).
    `encode_outputs(image, segs, found, files)` draws and encodes an image's files (the local
    engine's); `timings` per image: the seconds of its earlier steps (``load_s``)."""
    from persam.runs.records import image_record, output_files

    if options.save_similarity:
        raise SettingError("{save_similarity}: the heat map is PerSAM's (SAM's feature similarity); GF-SAM has "
                           "none to draw", "save_similarity")
    settings = replace(task.settings, min_similarity=options.min_similarity)
    # side by side only where both models run on torch (a compiled encoder runs one image at a time)
    on_torch = predictor.backend == "torch" and isinstance(task.dinov2, torch.nn.Module)
    workers = decode_workers(predictor, len(images)) if on_torch else 1

    def segment_one(pred, image):
        start = time.perf_counter()
        found = segment(pred, task.dinov2, task.concept, image, settings)
        return found, time.perf_counter() - start

    done = each_on_one_thread(predictor, segment_one, images, workers)
    results = []
    for target, image, (found, seconds), before in zip(targets, images, done, timings):
        segs = as_segmentations(found, options.multi, options.max_objects)
        kept = [s for s in segs if s.found]
        files = output_files(target.name, options)
        start = time.perf_counter()
        outputs = encode_outputs(image, segs, kept, files)
        measured = {**before, "segment_s": seconds, "outputs_s": time.perf_counter() - start}
        record = image_record(target, image, options, segs, measured, (), len(targets), files)
        record["score"] = round(float(found.score), 5)
        if options.multi:
            for entry in record.get("objects", []):
                entry["score"] = entry["iou_score"]
        results.append(ImageResult(record, outputs))
    return results
