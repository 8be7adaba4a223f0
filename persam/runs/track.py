"""``persam track``: find and follow the user's object through their own video.

The run (:func:`run_track`), its output folder and records, and coco.json (:func:`write_track_coco`).
The frames are read by persam.data.frames, the overlay video written by persam.data.video_writer,
the reference read by persam.runs.track_reference; the arguments are persam.cli.track_command's.

    persam track VIDEO --out DIR  (--concept C
                                   | [--ref-frame N | --ref-image IMG] (--ref-mask M | --ref-point X,Y ... | --ref-box B)
                                   | [--ref-frame N | --ref-image IMG] --ref-labels L)

VIDEO is a video file (what OpenCV reads: mp4, mov, avi, mkv, ...) or a folder of frames (its
images sorted by name, numbers in names compared as numbers).  The per-frame work is
:class:`persam.method.video.VideoTracker`'s (SAM 2.1's with ``frame_loop``: persam.runs.track_sam2;
GF-SAM's on each frame on its own: persam.runs.track_gfsam),
the loop of the DAVIS runner: every frame encoded once,
all objects decoded together, merged by the highest logit, each prompted with its box in the
previous processed frame.  The reference frame (``--ref-frame``, default 0) is encoded once
for learning; its output is the reference mask itself.  With ``--every K`` frames START,
START+K, ... before END are processed.  Into DIR go, each written atomically:

    NNNNN.png           per processed frame, named by its frame index: the mask (0/255), or with
                        --ref-labels a palette PNG of the object ids (as the label map)
    overlay.mp4         the processed frames with the objects tinted (colour of their id in the
                        DAVIS palette) and frames where an object is absent marked; the video's
                        size (an odd width or height made even), its fps divided by K; H.264
                        (PyAV's libx264), which browsers play.  Where PyAV cannot write H.264,
                        overlay.webm (VP9 or VP8, through OpenCV) instead; results.json
                        ``overlay`` names the file and codec.  Written as .overlay.partial.mp4
                        (.webm) and renamed when complete; rebuilt from the frames and the masks
                        when a run resumes
    reference_mask.png  the reference mask SAM made from --ref-point / --ref-box
    results.json        per processed frame and object: found, peak similarity, predicted IoU,
                        box; time per frame; strict JSON, rewritten as the run goes

The output folder follows persam.runs.folder's rules: it is locked for the run; results.json lists
every file persam wrote there (``files``) and a file the run would write that exists but is not
listed is refused; the run's ``key`` (:func:`persam.runs.key.settings_key` of what makes the masks:
the video and the reference by content, the method and its settings, the model and the
checkpoint's sha256, --every, --start, --min-similarity) must match the folder's, else the run
is refused unless ``--overwrite`` (which redoes everything).  An interrupted run resumes at the
first processed frame whose mask is missing, from the previous frame's mask (its boxes), so
that the masks are those of an uninterrupted run.  A video that cannot be decoded to its end
keeps what was done, says at which frame it stopped (results.json ``stopped``) and exits 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from persam.data.frames import FrameSource, FrameStop
from persam.errors import InputError, SettingError
from persam.data.io import atomic_save_png, atomic_write_text, load_label_map
from persam.data.video_writer import (OVERLAY_FILE, OVERLAY_FILES, PLAYABLE_CODECS, OverlayWriter, overlay_file_name,
                                      overlay_frame, partial_overlay_name)
from persam.runs.lock import output_lock
from persam.runs.records import REFERENCE_MASK_FILE, RESULTS_FILE
from persam.runs.track_folder import TRACK_FORMAT, TrackFolder
from persam.runs.track_reference import Reference

__all__ = ["TrackOptions", "run_track", "source_fingerprint", "write_track_coco", "TRACK_FORMAT",
           "reference_mask_by_sam"]

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"  # frames/s, even < 1
SAVE_EVERY_S = 1.0  # results.json is rewritten at most this often while frames are done (and at the end)


# --------------------------------------------------------------------------------------------
# the output folder


def source_fingerprint(source: FrameSource) -> str:
    """sha256 of the video file, or of a folder's frame names and contents (the run's key)."""
    import hashlib

    from persam.runs.key import file_sha256

    if source.kind == "video":
        return file_sha256(source.path)
    from sam.download import sha256_file

    digest = hashlib.sha256()
    for path in source.files:
        digest.update(f"{path.name}\t{sha256_file(path)}\n".encode("utf-8"))
    return digest.hexdigest()


@dataclass
class TrackOptions:
    every: int = 1
    start: int = 0
    end: Optional[int] = None  # exclusive; None: the end of the video
    min_similarity: Optional[float] = None
    overwrite: bool = False
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    use_previous_box: bool = True
    box_margin: float = 10.0
    method: str = "persam"
    finetune: object = None  # FinetuneSettings for PerSAM-F
    info: Dict[str, object] = field(default_factory=dict)  # recorded in results.json (readable)


def _mask_name(index: int, count: int) -> str:
    return f"{index:0{max(5, len(str(max(count - 1, 0))))}d}.png"


def _record(index: int, name: str, result, ids: Sequence[int]) -> dict:
    objects = []
    for i in ids:
        o = result.objects[i]
        objects.append({
            "id": int(i),
            "found": bool(o.found),
            "peak_similarity": None if o.peak_similarity is None else round(float(o.peak_similarity), 5),
            "iou_score": None if o.iou_score is None else round(float(o.iou_score), 5),
            "box": None if o.box is None else [round(float(v), 2) for v in o.box],
            "area": int(np.count_nonzero(result.label_map == i)),
        })
    return {"index": int(index), "mask": name, "reference": bool(result.reference), "objects": objects,
            "encode_s": round(float(result.encode_s), 4), "time_s": round(float(result.encode_s + result.segment_s), 4)}


# --------------------------------------------------------------------------------------------
# the run


def _make_tracker(predictor, reference: Reference, options: TrackOptions, out_dir: Path, log):
    """The tracker and, for a reference frame of the video, that frame's result (the reference masks)."""
    from persam.method.video import VideoTracker, learn_concepts

    tracker_options = dict(use_previous_box=options.use_previous_box, box_margin=options.box_margin,
                           min_similarity=options.min_similarity)
    if reference.kind == "concept":
        return VideoTracker(predictor, {1: reference.concept}, **tracker_options), None
    encoded = None
    masks = reference.masks
    if masks is None:
        encoded = reference_mask_by_sam(predictor, reference, out_dir, log)
        masks = reference.masks
    if reference.kind == "image":
        concepts = learn_concepts(predictor, reference.image, masks, options.method, options.finetune, encoded)
        return VideoTracker(predictor, concepts, **tracker_options), None
    tracker, result = VideoTracker.learn(predictor, reference.image, masks, options.method, options.finetune, encoded,
                                         **tracker_options)
    return tracker, result


def reference_mask_by_sam(predictor, reference: Reference, out_dir: Path, log):
    """SAM makes the mask of object 1 from the reference's clicks / box: set as ``reference.masks`` and
    saved as OUT/reference_mask.png.  Returns the reference image's (features, original size)."""
    from persam.method.target import reference_mask_from_prompts

    encoded = (predictor.set_image(reference.image), predictor.original_size)
    mask = reference_mask_from_prompts(predictor, points=reference.points, box=reference.box)
    if mask is None:
        where = f"frame {reference.frame}" if reference.kind == "frame" else "the reference image"
        raise SettingError(f"{where}: SAM found no object at the given {'box' if reference.box else 'points'}; "
                           f"give {{ref_mask}} instead", "ref_mask")
    atomic_save_png(out_dir / REFERENCE_MASK_FILE, np.asarray(mask, dtype=bool))
    log(f"reference mask made by SAM: {out_dir / REFERENCE_MASK_FILE}")
    reference.masks = {1: np.asarray(mask, dtype=bool)}
    return encoded


def _save_mask(path: Path, label_map: np.ndarray, palette: bool) -> None:
    if palette:
        atomic_save_png(path, label_map.astype(np.uint8), palette="davis")
    else:
        atomic_save_png(path, label_map > 0)


def _frame_plan(source: FrameSource, out_dir: Path, options: TrackOptions) -> List[int]:
    """The indices of the frames to process; SettingError for a range the video does not have."""
    if source.kind == "folder" and out_dir.resolve() == source.path.resolve():
        raise SettingError(f"{{out}} {out_dir} is the frame folder; write the outputs to another folder", "out")
    if not 0 <= options.start < source.count:
        raise SettingError(f"{{start}} {options.start}: {source.path} has {source.count} frames "
                           f"(0..{source.count - 1})", "start")
    stop = source.count if options.end is None else min(options.end, source.count)
    if stop <= options.start:
        raise SettingError(f"{{end}} {options.end} must be after {{start}} {options.start}", "end", "start")
    return list(range(options.start, stop, options.every))


def _run_settings(source: FrameSource, reference: Reference, plan: List[int], made_with: dict,
                  options: TrackOptions) -> Tuple[dict, dict]:
    """What makes the masks (the run's key) and results.json's header."""
    made_with = dict(made_with, video_sha256=source_fingerprint(source), every=options.every, start=options.start,
                     min_similarity=options.min_similarity, method=options.method,
                     use_previous_box=options.use_previous_box, box_margin=options.box_margin)
    header = {"command": "track", "video": str(source.path), "video_kind": source.kind, "frame_count": source.count,
              "fps": round(source.fps, 4), "overlay_fps": round(source.fps / options.every, 4),
              "size": list(source.size), "objects": reference.ids, "palette_masks": reference.labels, **options.info,
              "reference": reference.describe, "every": options.every, "start": options.start,
              "end": source.count if options.end is None else min(options.end, source.count),
              "min_similarity": options.min_similarity}
    return made_with, header


def run_track(
    source: FrameSource,
    reference: Reference,
    out_dir,
    predictor_factory: Callable[[], object],
    made_with: dict,
    options: Optional[TrackOptions] = None,
    log: Optional[Callable[[str], None]] = None,
    frame_loop: Optional[Callable[..., "_FrameLoop"]] = None,
) -> dict:
    """Track the reference's objects through `source` into `out_dir` (see the module doc).

    `predictor_factory` builds the SamPredictor when a frame is to be segmented (not when all is
    done); `made_with` describes what makes the masks besides `options` (the run's key).  Returns
    results.json's content; ``stopped`` is set when the video could not be read to its end.
    `frame_loop` replaces PerSAM's per-frame work (a :class:`_FrameLoop` subclass, e.g.
    persam.runs.track_sam2.Sam2FrameLoop, whose `predictor_factory` builds what it needs)."""
    options = options or TrackOptions()
    out_dir = Path(out_dir)
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    plan = _frame_plan(source, out_dir, options)
    names = {i: _mask_name(i, source.count) for i in plan}
    made_with, header = _run_settings(source, reference, plan, made_with, options)
    overlay_name, not_mp4 = overlay_file_name()
    with TrackFolder(out_dir, made_with, header, options.overwrite, log) as folder:
        outputs = [names[i] for i in plan] + [overlay_name, partial_overlay_name(overlay_name)]
        if reference.masks is None and reference.kind != "concept":
            outputs.append(REFERENCE_MASK_FILE)
        folder.refuse_foreign(outputs)
        if options.overwrite:
            folder.remove_stale(outputs)
        stopped_at = folder.stopped.get("frame") if folder.stopped else None
        reachable = [i for i in plan if stopped_at is None or i < stopped_at]
        first_missing = next((k for k, i in enumerate(reachable) if i not in folder.records), None)
        overlay_done = folder.overlay is not None and folder.overlay.get("frames") == reachable and (
            not reachable or folder.overlay.get("codec") in PLAYABLE_CODECS)  # an older persam's mp4v: again
        if first_missing is None and overlay_done:
            return _already_done(folder, source, plan, reachable, log)
        folder.stopped = None
        folder.overlay = None
        folder.claim(outputs)
        done_before = len(reachable) if first_missing is None else first_missing
        if done_before:
            log(f"resuming at frame {plan[done_before] if done_before < len(plan) else plan[-1]}: "
                f"{done_before} frame(s) already done in {out_dir}")
        writer = OverlayWriter(out_dir, overlay_name, source.fps / options.every, source.size)
        if not_mp4:
            log(f"persam: note: the overlay video is {overlay_name} ({writer.codec.upper()}: browsers play it, some "
                f"players do not) as {not_mp4}; pip install av for {OVERLAY_FILE} (H.264)")
        frames = (frame_loop or _FrameLoop)(folder, reference, options, names, writer, predictor_factory, log)
        data = frames.run(source, plan, done_before)
    if folder.stopped:
        log(f"persam: warning: {source.path}: stopped at frame {folder.stopped['frame']} "
            f"({folder.stopped['reason']}); the {len(frames.written)} frame(s) before it are kept in {out_dir}")
    return data


def _already_done(folder: TrackFolder, source: FrameSource, plan: List[int], reachable: List[int], log) -> dict:
    data = folder.save()
    if folder.stopped:
        log(f"persam: warning: {source.path} stopped at frame {folder.stopped.get('frame')} "
            f"({folder.stopped.get('reason')}); the {len(reachable)} frame(s) before it are done in {folder.out_dir}")
    else:
        log(f"all {len(plan)} frame(s) already done in {folder.out_dir} (use --overwrite to redo them)")
    return data


class _FrameLoop:
    """The frames of one run: those done earlier replayed into the overlay from their masks, the
    others segmented (the model built at the first of them), results.json saved as it goes."""

    def __init__(self, folder: TrackFolder, reference: Reference, options: TrackOptions, names: Dict[int, str],
                 writer: OverlayWriter, predictor_factory: Callable[[], object], log) -> None:
        self.folder, self.reference, self.options, self.names = folder, reference, options, names
        self.writer, self.predictor_factory, self.log = writer, predictor_factory, log
        self.tracker, self.reference_result, self.bar = None, None, None
        self.previous = None  # label map of the previous processed frame, or the reference masks
        self.written: List[int] = []
        self.run_frames, self.run_start = 0, None

    def run(self, source: FrameSource, plan: List[int], done_before: int) -> dict:
        """Every frame of `plan`; results.json's content as finally written."""
        last_save = time.monotonic()
        complete = False
        try:
            try:
                for position, (index, frame) in enumerate(source.frames(plan)):
                    if position < done_before:
                        self._replay(index, frame)
                        continue
                    self._segment(index, frame, position, len(plan))
                    if time.monotonic() - last_save >= SAVE_EVERY_S:
                        self.folder.save()
                        last_save = time.monotonic()
            except FrameStop as halt:
                self.folder.stopped = {"frame": halt.index, "reason": halt.reason}
            if self.bar is not None:
                self.bar.close()
            self._finish_overlay()
            complete = True
        finally:
            if not complete:
                self.writer.abandon()
                if self.bar is not None:
                    self.bar.close()
            seconds = (time.perf_counter() - self.run_start) if self.run_start is not None else 0.0
            summary = {"this_run": {"frames": self.run_frames, "seconds": round(seconds, 3),
                                    "frames_per_second": round(self.run_frames / seconds, 4) if seconds > 0 else None}}
            data = self.folder.save(summary)
        return data

    def _replay(self, index: int, frame: np.ndarray) -> None:
        """A frame done earlier: into the overlay again, from its mask."""
        record = self.folder.records[index]
        label_map = load_label_map(self.folder.out_dir / record["mask"])
        found = {o["id"]: bool(o["found"]) for o in record["objects"]}
        self.writer.write(overlay_frame(frame, label_map, self.reference.ids, found, record.get("reference", False)))
        self.written.append(index)
        ref_masks = self.reference.masks if record.get("reference") else None
        self.previous = ref_masks if ref_masks is not None else label_map

    def _start(self, position: int, total: int) -> None:
        models = self.predictor_factory()
        self.run_start = time.perf_counter()  # the frames/s count learning, not building the model
        self.tracker, self.reference_result = self._make_tracker(models)
        self.tracker.restart(self.previous)
        progress = self.options.progress
        self.bar = tqdm(total=total, initial=position, desc="tracking", unit=" frames", file=sys.stderr,
                        bar_format=BAR_FORMAT, disable=(not progress) if progress is not None else None)

    def _make_tracker(self, models):
        """The per-frame tracker (``track``, ``restart``) from what `predictor_factory` built, and the
        reference frame's result (None without one); a subclass's other method goes here."""
        return _make_tracker(models, self.reference, self.options, self.folder.out_dir, self.log)

    def _frame_record(self, index: int, result) -> dict:
        """results.json's record of a segmented frame."""
        return _record(index, self.names[index], result, self.reference.ids)

    def _segment(self, index: int, frame: np.ndarray, position: int, total: int) -> None:
        if self.tracker is None:
            self._start(position, total)
        reference = self.reference
        if reference.kind == "frame" and index == reference.frame:
            result = self.reference_result
            self.tracker.restart(reference.masks)
        else:
            result = self.tracker.track(frame)
        _save_mask(self.folder.out_dir / self.names[index], result.label_map, reference.labels)
        self.folder.records[index] = self._frame_record(index, result)
        found = {i: o.found for i, o in result.objects.items()}
        self.writer.write(overlay_frame(frame, result.label_map, reference.ids, found, result.reference))
        self.written.append(index)
        self.run_frames += 1
        self.bar.update(1)

    def _finish_overlay(self) -> None:
        """Close the overlay video and drop the overlay files of earlier runs this one replaced."""
        made = self.writer.finish()
        folder = self.folder
        folder.overlay = {"file": self.writer.final.name if made else None, "codec": self.writer.codec if made else None,
                          "size": list(self.writer.size), "frames": self.written}
        for name in OVERLAY_FILES + tuple(map(partial_overlay_name, OVERLAY_FILES)):
            if name != folder.overlay["file"] and name in folder.files:  # renamed, or an earlier run's other one
                folder.remove([name])


# --------------------------------------------------------------------------------------------
# coco.json


def write_track_coco(out_dir, data: dict, category: str, frame_files: Sequence = ()) -> dict:
    """Write OUT/coco.json of a finished `persam track` run: the folder locked again, coco.json
    listed in its results.json (``files``) first, and refused when it is a file of the user's.
    Returns results.json's content as rewritten."""
    from persam.data.coco import COCO_FILE, require_pycocotools, track_to_coco, write_coco

    require_pycocotools()
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        path = out_dir / RESULTS_FILE
        current = json.loads(path.read_text(encoding="utf-8"))
        if current.get("key") != data.get("key"):
            raise InputError(f"{path} changed while coco.json was being written (another run); run again")
        files = set(current.get("files") or [])
        if (out_dir / COCO_FILE).exists() and COCO_FILE not in files:
            raise SettingError(f"{out_dir / COCO_FILE} was not written by persam (results.json there does not list "
                               f"it); refusing to replace it: use another {{out}}, or move the file away", "out")
        if COCO_FILE not in files:
            current["files"] = sorted(files | {COCO_FILE})
            atomic_write_text(path, json.dumps(current, indent=2, allow_nan=False) + "\n")
        write_coco(out_dir / COCO_FILE, track_to_coco(out_dir, current, category, frame_files))
    return current
