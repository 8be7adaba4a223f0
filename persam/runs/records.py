"""What a batch run is made of and what it records of each image.

:class:`RunOptions` (the run's settings), :class:`Target` (one image and its output name), the
output files of a target (:func:`output_files`), :class:`ImageResult` (one segmented image's record
and output files, not yet written), the record of a segmented image and of each of its objects
(:func:`image_record`), the record of an image that could not be loaded (:func:`error_result`),
and :func:`write_result`, which writes one result's files atomically.  The file names of the
output folder are here too (results.json, reference_mask.png).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from persam.data.io import atomic_write_bytes
from persam.method.pipeline import Segmentation
from persam.runs.defaults import DEFAULT_BATCH_SIZE

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "persam-results"
RESULTS_VERSION = 2  # 2: format, key, made_with, other_keys, files; records with key and image_sha256
REFERENCE_MASK_FILE = "reference_mask.png"  # written by `persam segment` from clicks or a box
REFERENCE_IMAGE = "reference image"  # the skip reason of a target that is the reference image
MAX_LABELS = 255  # objects one 8-bit label PNG can hold (0 is background)


@dataclass
class RunOptions:
    multi: bool = False
    max_objects: int = 5
    min_similarity: Optional[float] = None
    save_similarity: bool = False
    overwrite: bool = False
    overlay_format: str = "jpg"  # "jpg" or "png"
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    info: Dict[str, object] = field(default_factory=dict)  # run settings recorded in results.json
    # What makes the masks besides the options above (the reference or concept by content, the
    # method and its settings, model type, checkpoint sha256, precision): part of the run's key.
    made_with: Dict[str, object] = field(default_factory=dict)
    reference_images: Sequence[Path] = ()  # a target that is one of these (file or content) is skipped
    extra_outputs: Sequence[str] = ()  # files the caller writes into the folder during the run
    # Images segmented together: on a CPU up to one per torch thread side by side, each on one thread
    # (persam.method.pipeline.each_on_one_thread); on a GPU each decoder call of the method is made once for
    # all of them (persam.method.pipeline.segment_images), and they are encoded together.
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 1 <= self.max_objects <= MAX_LABELS:
            raise ValueError(f"max_objects must be between 1 and {MAX_LABELS} (the label PNG holds {MAX_LABELS} "
                             f"objects), got {self.max_objects}")
        if self.overlay_format not in ("jpg", "png"):
            raise ValueError(f"overlay_format must be 'jpg' or 'png', got {self.overlay_format!r}")


@dataclass
class Target:
    path: Path
    name: str  # output file stem, unique within the run
    done: bool = False  # segmented by an earlier run with the same key; all outputs exist
    sha256: Optional[str] = None  # of the image file; None when it cannot be read
    skip_reason: Optional[str] = None  # why it is not segmented (the reference image)
    stat: Optional[List[int]] = None  # [size, mtime_ns] of the image file when planned (persam.data.sources.image_stat)

    @property
    def pending(self) -> bool:
        """To be segmented in this run."""
        return not self.done and self.skip_reason is None


def output_files(name: str, options: RunOptions) -> Dict[str, str]:
    files = {"mask": f"{name}.png", "overlay": f"{name}_overlay.{options.overlay_format}"}
    if options.save_similarity:
        files["similarity"] = f"{name}_similarity.png"
    return files


# --------------------------------------------------------------------------------------------
# one image's result and records: the same for every engine (the local one, and the workers of
# persam.runs.engine_ray)


@dataclass
class ImageResult:
    """What segmenting one target makes: its record and its output files (name, bytes), to be
    written in this order (the mask last: it marks the image done).  No file is written yet:
    :meth:`OutputFolder.add_result` writes them (in the process that holds the folder)."""

    record: dict
    outputs: List[Tuple[str, bytes]] = field(default_factory=list)



def _floats(x, ndigits: int = 2) -> Optional[list]:
    if x is None:
        return None
    return [round(float(v), ndigits) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def _points(x) -> list:
    return [[round(float(a), 2), round(float(b), 2)] for a, b in np.asarray(x, dtype=np.float64).reshape(-1, 2)]


def _object_record(seg: Segmentation) -> dict:
    return {
        "found": bool(seg.found),
        "iou_score": round(float(seg.iou_score), 5),
        "peak_similarity": round(float(seg.peak_similarity), 5),
        "points": _points(seg.points),
        "labels": [int(v) for v in np.asarray(seg.labels).reshape(-1)],
        "box": _floats(seg.box) if seg.found else None,
        "area": int(np.count_nonzero(seg.mask)),
    }


def all_points(segs: List[Segmentation]):
    if not segs:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    points = np.concatenate([np.asarray(s.points, dtype=np.float32).reshape(-1, 2) for s in segs])
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64).reshape(-1) for s in segs])
    return points, labels


def error_result(target: Target, message: str) -> ImageResult:
    """The result of a target that could not be loaded (no outputs)."""
    return ImageResult({"name": target.name, "image": str(target.path), "status": "error", "error": message})


def image_record(target: Target, image: np.ndarray, options: RunOptions, segs: List[Segmentation],
                 timings: Dict[str, float], shared: Sequence[str], group_size: int,
                 files: Dict[str, str]) -> dict:
    """The record of one segmented image; `timings`: the seconds of its steps (see
    :func:`persam.runs.local.segment_loaded_images`), `files`: its outputs (:func:`output_files`)."""
    found = [s for s in segs if s.found]
    first = segs[0] if segs else None
    points, labels = all_points(segs)
    boxes = [s.box for s in found if s.box is not None]
    record = {"name": target.name, "image": str(target.path)}
    record.update(
        status="ok",
        size=[int(image.shape[1]), int(image.shape[0])],
        found=bool(found),
        iou_score=round(float(found[0].iou_score if found else (first.iou_score if first else 0.0)), 5),
        peak_similarity=round(float(max((s.peak_similarity for s in segs), default=0.0)), 5),
        points=_points(points),
        labels=[int(v) for v in labels],
        boxes=[_floats(b) for b in boxes],
        timings={**{k: round(float(v), 4) for k, v in timings.items()},
                 "shared": [k for k in shared if k in timings], "group_size": int(group_size)},
        outputs=files,
    )
    if options.multi:
        record["objects"] = [_object_record(s) for s in found]
    return record


def write_result(out_dir: Path, result: ImageResult, log: Callable[[str], None]) -> dict:
    """Write one image's output files atomically, in order (the mask last); its record (a copy).
    A failure or an interruption while writing leaves none of its outputs behind; an error
    record is reported through `log`."""
    written: List[Path] = []
    try:
        for name, data in result.outputs:
            written.append(atomic_write_bytes(Path(out_dir) / name, data))
    except BaseException:  # interrupted or failed: leave no outputs of this image behind
        for path in written:
            path.unlink(missing_ok=True)
        raise
    record = dict(result.record)
    if record.get("status") == "error":
        log(f"persam: warning: {record.get('error')} (skipped)")
    return record
