"""``persam track``: find and follow the user's object through their own video.

    persam track VIDEO --out DIR  (--concept C
                                   | [--ref-frame N | --ref-image IMG] (--ref-mask M | --ref-point X,Y ... | --ref-box B)
                                   | [--ref-frame N | --ref-image IMG] --ref-labels L)

VIDEO is a video file (what OpenCV reads: mp4, mov, avi, mkv, ...) or a folder of frames (its
images sorted by name, numbers in names compared as numbers).  The per-frame work is
:class:`persam.video.VideoTracker`'s, the loop of the DAVIS runner: every frame encoded once,
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

The output folder follows persam.run's rules: it is locked for the run; results.json lists
every file persam wrote there (``files``) and a file the run would write that exists but is not
listed is refused; the run's ``key`` (:func:`persam.run.settings_key` of what makes the masks:
the video and the reference by content, the method and its settings, the model and the
checkpoint's sha256, --every, --start, --min-similarity) must match the folder's, else the run
is refused unless ``--overwrite`` (which redoes everything).  An interrupted run resumes at the
first processed frame whose mask is missing, from the previous frame's mask (its boxes), so
that the masks are those of an uninterrupted run.  A video that cannot be decoded to its end
keeps what was done, says at which frame it stopped (results.json ``stopped``) and exits 1.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .io import InputError, atomic_save_png, atomic_write_text, davis_palette, load_image, load_label_map, load_mask
from .run import IMAGE_EXTENSIONS, LOCK_FILE, RESULTS_FILE, _differences, _strict_json, output_lock, settings_key

__all__ = ["FrameSource", "FrameStop", "Reference", "TrackOptions", "open_video", "run_track", "track_command",
           "overlay_frame", "overlay_file_name", "OVERLAY_FILE", "WEBM_OVERLAY_FILE", "TRACK_FORMAT"]

TRACK_FORMAT = "persam-track"
TRACK_VERSION = 1
OVERLAY_FILE = "overlay.mp4"  # H.264 (PyAV's libx264); where PyAV has no H.264 encoder, WEBM_OVERLAY_FILE
WEBM_OVERLAY_FILE = "overlay.webm"  # VP9 (else VP8) through OpenCV's FFmpeg
OVERLAY_FILES = (OVERLAY_FILE, WEBM_OVERLAY_FILE)
PLAYABLE_CODECS = ("h264", "vp9", "vp8")  # an overlay recorded with another codec (or none: mp4v) is written again
REFERENCE_MASK_FILE = "reference_mask.png"
DEFAULT_FPS = 24.0  # of a folder of frames (DAVIS's)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"  # frames/s, even < 1
SAVE_EVERY_S = 1.0  # results.json is rewritten at most this often while frames are done (and at the end)


# --------------------------------------------------------------------------------------------
# reading frames


class FrameStop(Exception):
    """The video cannot be read on from frame `index` (truncated, corrupt, a frame of another size)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"frame {index}: {reason}")
        self.index = index
        self.reason = reason


def _quiet_ffmpeg() -> None:
    """Keep FFmpeg's own lines ("moov atom not found", ...) off stderr: persam says what went wrong in
    one line.  Read by OpenCV when its FFmpeg backend starts; OPENCV_FFMPEG_LOGLEVEL set by the user wins."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", path.name)]


@dataclass
class FrameSource:
    """The frames of a video file or of a folder of images, read in order."""

    path: Path
    kind: str  # "video" or "folder"
    count: int  # frames (a video file: as its container says; fewer may be decodable)
    fps: float
    size: Tuple[int, int]  # width, height
    files: List[Path] = field(default_factory=list)  # a folder's frames, in order

    def read(self, index: int) -> np.ndarray:
        """Frame `index` (RGB uint8); InputError when it cannot be read."""
        if not 0 <= index < self.count:
            raise InputError(f"{self._what()} has {self.count} frames (0..{self.count - 1}); there is no frame {index}")
        try:
            for _, frame in self.frames([index]):
                return frame
        except FrameStop as stop:
            raise InputError(f"{self._what()}: cannot read frame {index} ({stop.reason})") from None
        raise InputError(f"{self._what()}: cannot read frame {index}")  # pragma: no cover

    def frames(self, indices: Sequence[int]) -> Iterator[Tuple[int, np.ndarray]]:
        """(index, RGB uint8 frame) for the ascending `indices`; FrameStop at the first frame that
        cannot be read (a video is decoded in order: a frame before a wanted one may be the one)."""
        if self.kind == "folder":
            yield from self._folder_frames(indices)
        else:
            yield from self._video_frames(indices)

    def _what(self) -> str:
        return f"{'video' if self.kind == 'video' else 'frame folder'} {self.path}"

    def _check_size(self, index: int, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        if (w, h) != self.size:
            raise FrameStop(index, f"the frame is {w}x{h} but frame 0 is {self.size[0]}x{self.size[1]}")

    def _folder_frames(self, indices: Sequence[int]) -> Iterator[Tuple[int, np.ndarray]]:
        for index in indices:
            try:
                frame = load_image(self.files[index])
            except InputError as exc:
                raise FrameStop(index, str(exc)) from None
            self._check_size(index, frame)
            yield index, (frame if frame.flags.writeable else frame.copy())

    def _video_frames(self, indices: Sequence[int]) -> Iterator[Tuple[int, np.ndarray]]:
        import cv2

        _quiet_ffmpeg()
        capture = cv2.VideoCapture(str(self.path))
        try:
            if not capture.isOpened():
                raise FrameStop(0, "the file cannot be opened any more")
            position = 0
            for index in indices:
                while position < index:  # frames not wanted: decoded, not converted
                    if not capture.grab():
                        raise FrameStop(position, self._unreadable(position))
                    position += 1
                ok, bgr = capture.read()
                if not ok or bgr is None:
                    raise FrameStop(index, self._unreadable(index))
                position += 1
                frame = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                self._check_size(index, frame)
                yield index, frame
        finally:
            capture.release()

    def _unreadable(self, index: int) -> str:
        return f"cannot decode frame {index} of the {self.count} the file announces (truncated or corrupt)"

    def fingerprint(self) -> str:
        """sha256 of the video file, or of a folder's frame names and contents."""
        import hashlib

        from .run import file_sha256

        if self.kind == "video":
            return file_sha256(self.path)
        from sam.download import sha256_file

        digest = hashlib.sha256()
        for path in self.files:
            digest.update(f"{path.name}\t{sha256_file(path)}\n".encode("utf-8"))
        return digest.hexdigest()


def open_video(path, fps: Optional[float] = None) -> FrameSource:
    """The frames of a video file or folder; InputError (one line) when it cannot be read at all.

    `fps` is a folder's frame rate (default 24); a video file has its own."""
    import cv2

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"video {p}: file not found")
    if p.is_dir():
        files = sorted((q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
        if not files:
            raise InputError(f"frame folder {p} holds no frames ({', '.join(IMAGE_EXTENSIONS)})")
        first = load_image(files[0])
        h, w = first.shape[:2]
        return FrameSource(p, "folder", len(files), float(fps or DEFAULT_FPS), (w, h), files)
    _quiet_ffmpeg()
    capture = cv2.VideoCapture(str(p))
    try:
        if not capture.isOpened():
            raise InputError(f"video {p}: cannot be opened: not a video OpenCV can decode, or truncated "
                             f"(an mp4 cut off before its index cannot be opened)")
        ok, bgr = capture.read()
        if not ok or bgr is None:
            raise InputError(f"video {p}: no frame can be decoded (truncated or corrupt)")
        h, w = bgr.shape[:2]
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        own_fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if count <= 0:  # the container does not say: count what decodes
            count = 1
            while capture.grab():
                count += 1
    finally:
        capture.release()
    if not (np.isfinite(own_fps) and own_fps > 0):
        own_fps = float(fps or DEFAULT_FPS)
    return FrameSource(p, "video", count, own_fps, (w, h))


# --------------------------------------------------------------------------------------------
# the reference


@dataclass
class Reference:
    """What the objects are: a concept, or masks (or clicks / a box) on a frame or an image.

    kind "concept": `concept` (object 1).  kind "frame": frame `frame` of the video.  kind
    "image": `image` from elsewhere.  For "frame" and "image", `masks` ({id: bool mask}) or,
    when SAM must make the mask of object 1, `points` / `box`."""

    kind: str
    concept: object = None
    frame: Optional[int] = None
    image: Optional[np.ndarray] = None
    masks: Optional[Dict[int, np.ndarray]] = None
    points: Optional[List[Tuple[float, float]]] = None
    box: Optional[Tuple[float, float, float, float]] = None
    labels: bool = False  # the masks come from a label map: palette PNG outputs
    describe: Dict[str, object] = field(default_factory=dict)  # readable, for results.json
    content: Dict[str, object] = field(default_factory=dict)  # by content, for the run's key

    @property
    def ids(self) -> List[int]:
        return sorted(self.masks) if self.masks is not None else [1]


def _check_inside(coords, w: int, h: int, edge: int, where: str) -> None:
    for x, y in coords:
        if not (0 <= x < w + edge and 0 <= y < h + edge):
            kind = "box corner" if edge else "click"
            raise InputError(f"reference {kind} ({x:g}, {y:g}) is outside {where} ({w}x{h})")


def read_reference(args, source: FrameSource) -> Reference:
    """The reference from the command's arguments, loaded and checked (before the model is built)."""
    from .io import check_reference_mask
    from .run import file_sha256

    shapes = [name for name, given in (("--ref-mask", args.ref_mask), ("--ref-point", args.ref_point),
                                        ("--ref-box", args.ref_box is not None), ("--ref-labels", args.ref_labels))
              if given]
    if args.concept:
        if shapes or args.ref_image or args.ref_frame is not None:
            raise InputError("--concept is the whole reference: leave out --ref-image, --ref-frame and "
                             + ", ".join(shapes or ["--ref-mask / --ref-point / --ref-box / --ref-labels"]))
        if args.finetune:
            raise InputError("--finetune needs a reference mask; a concept is already learned (use `persam learn "
                             "--finetune` to make a PerSAM-F concept)")
        from .concept import load_concept

        concept = load_concept(args.concept)  # the file is checked here; the model when it is known
        return Reference("concept", concept=concept, describe={"concept": str(args.concept)},
                         content={"concept_sha256": file_sha256(args.concept)})
    if not shapes:
        raise InputError("the object needs --concept, or --ref-mask / --ref-point / --ref-box / --ref-labels on "
                         "--ref-frame N (default 0) or on a --ref-image")
    if len(shapes) > 1:
        raise InputError(f"give the reference as one of --ref-mask, --ref-point, --ref-box or --ref-labels, "
                         f"not {' and '.join(shapes)}")
    if args.ref_image and args.ref_frame is not None:
        raise InputError("give the reference on --ref-frame N of the video or on a --ref-image, not both")

    if args.ref_image:
        image_path = Path(args.ref_image)
        image = load_image(image_path)
        where = f"reference image {image_path}"
        ref = Reference("image", image=image if image.flags.writeable else image.copy())
        ref.describe["image"] = str(image_path)
        ref.content["image_sha256"] = file_sha256(image_path)
    else:
        index = 0 if args.ref_frame is None else args.ref_frame
        image = source.read(index)
        where = f"frame {index} of {source.path}"
        ref = Reference("frame", frame=index, image=image)
        ref.describe["frame"] = index
        ref.content["frame"] = index
    h, w = image.shape[:2]

    if args.ref_mask:
        mask = load_mask(args.ref_mask)
        if mask.shape != (h, w):
            raise InputError(f"--ref-mask {args.ref_mask} is {mask.shape[1]}x{mask.shape[0]} but {where} is {w}x{h}")
        ref.masks = {1: check_reference_mask(mask, args.ref_mask)}
        ref.describe["mask"] = str(args.ref_mask)
        ref.content["mask_sha256"] = file_sha256(args.ref_mask)
    elif args.ref_labels:
        labels = load_label_map(args.ref_labels)
        if labels.shape != (h, w):
            raise InputError(f"--ref-labels {args.ref_labels} is {labels.shape[1]}x{labels.shape[0]} but {where} "
                             f"is {w}x{h}")
        ids = [int(i) for i in np.unique(labels) if i not in (0, 255)]
        if not ids:
            raise InputError(f"--ref-labels {args.ref_labels} holds no object (ids 1..254; 0 is background, 255 void)")
        if max(ids) > 254:
            raise InputError(f"--ref-labels {args.ref_labels} has object id {max(ids)}; a palette PNG holds ids 1..254")
        ref.masks = {i: labels == i for i in ids}
        ref.labels = True
        ref.describe["labels"] = str(args.ref_labels)
        ref.content["labels_sha256"] = file_sha256(args.ref_labels)
    elif args.ref_point:
        _check_inside(args.ref_point, w, h, 0, where)
        ref.points = [tuple(p) for p in args.ref_point]
        ref.describe["points"] = ref.content["points"] = [list(p) for p in ref.points]
    else:
        _check_inside([args.ref_box[:2], args.ref_box[2:]], w, h, 1, where)
        ref.box = tuple(args.ref_box)
        ref.describe["box"] = ref.content["box"] = list(ref.box)
    return ref


# --------------------------------------------------------------------------------------------
# the overlay


def overlay_frame(frame: np.ndarray, label_map: np.ndarray, ids: Sequence[int], found: Dict[int, bool],
                  reference: bool = False) -> np.ndarray:
    """`frame` (RGB uint8) with each object tinted in its id's DAVIS palette colour and outlined;
    a red frame and "not found" where an object is absent; "reference" on the reference frame
    (drawn by persam.visualize, as the overlays of `persam segment`)."""
    from . import visualize

    ids = list(ids)
    out = visualize.overlay(frame, [label_map == i for i in ids], colors=davis_palette()[ids])
    missing = [i for i in ids if not found.get(i, False)]
    notes = []
    if missing:
        notes.append((visualize.NOT_FOUND if len(ids) == 1 else
                      f"{visualize.NOT_FOUND}: " + ", ".join(f"object {i}" for i in missing), visualize.NOT_FOUND_TEXT))
    if reference:
        notes.append(("reference", visualize.NOTE_TEXT))
    return visualize.annotate(out, notes, red_frame=bool(missing)) if notes else out


H264_ENCODER = "libx264"
WEBM_FOURCCS = (("VP90", "vp9"), ("VP80", "vp8"))  # OpenCV's, tried in this order


def partial_overlay_name(name: str) -> str:
    """The temporary name an overlay is written under: .overlay.partial.mp4 for overlay.mp4."""
    stem, _, suffix = name.rpartition(".")
    return f".{stem}.partial.{suffix}"


def _pyav_h264() -> Optional[str]:
    """Why PyAV cannot write H.264 in MP4 here (not installed, no libx264 in its FFmpeg), or None when it can:
    one frame is encoded into memory to find out."""
    try:
        import av
    except ImportError:
        return "PyAV (the av package) is not installed"
    try:
        with av.open(io.BytesIO(), "w", format="mp4") as container:
            stream = container.add_stream(H264_ENCODER, rate=24)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except Exception as exc:  # noqa: BLE001 - an FFmpeg build without the encoder fails in several ways
        return f"PyAV {getattr(av, '__version__', '')} cannot encode with {H264_ENCODER}: {exc}"
    return None


def overlay_file_name() -> Tuple[str, Optional[str]]:
    """The overlay's name here, and why it is not overlay.mp4 (None when it is): overlay.mp4 (H.264, what
    every browser and player plays) where PyAV can write it, else overlay.webm (VP9 or VP8 through OpenCV)."""
    why = _pyav_h264()
    return (OVERLAY_FILE, None) if why is None else (WEBM_OVERLAY_FILE, why)


class _OverlayWriter:
    """An overlay video written under a temporary name and renamed when complete (removed when not).

    overlay.mp4: H.264 (libx264 through PyAV), yuv420p, the index at the start (faststart) so that a
    browser plays it while it loads.  overlay.webm: VP9, else VP8, through OpenCV.  Both need an even
    width and height: a frame of odd width or height gets a copy of its last column or row."""

    def __init__(self, out_dir: Path, name: str, fps: float, size: Tuple[int, int]) -> None:
        self.final = out_dir / name
        self.partial = out_dir / partial_overlay_name(name)
        if os.path.lexists(self.partial):
            self.partial.unlink()
        w, h = size
        self.size = (w + w % 2, h + h % 2)
        self.frames = 0
        self.container = self.stream = self.writer = None
        if name == OVERLAY_FILE:
            self._open_h264(fps)
        else:
            self._open_webm(fps)

    def _open_h264(self, fps: float) -> None:
        import av

        self.codec = "h264"
        try:
            self.container = av.open(str(self.partial), "w", format="mp4", options={"movflags": "+faststart"})
            # swscale turns the RGB frames into BT.601 limited-range YUV: say so in the stream
            self.stream = self.container.add_stream(H264_ENCODER, rate=Fraction(fps).limit_denominator(1001),
                                                    options={"colorspace": "smpte170m", "color_range": "tv"})
            self.stream.width, self.stream.height = self.size
            self.stream.pix_fmt = "yuv420p"
        except (OSError, ValueError, av.error.FFmpegError) as exc:
            self.abandon()
            raise InputError(f"cannot write the overlay video {self.partial} ({exc})") from None

    def _open_webm(self, fps: float) -> None:
        import cv2

        for fourcc, codec in WEBM_FOURCCS:
            self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*fourcc), fps, self.size)
            if self.writer.isOpened():
                self.codec = codec
                return
            self.writer.release()
        self.writer = None
        self.abandon()
        raise InputError(f"cannot write the overlay video {self.partial} (neither PyAV with {H264_ENCODER} nor "
                         f"OpenCV with VP9 or VP8 can encode here, or the folder is not writable)")

    def write(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if (w, h) != self.size:
            rgb = np.pad(rgb, ((0, self.size[1] - h), (0, self.size[0] - w), (0, 0)), mode="edge")
        if self.stream is not None:
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        else:
            import cv2

            self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def finish(self) -> bool:
        """Rename the complete video to its name; False (and nothing written) when it has no frame."""
        if self.frames == 0:
            self.abandon()
            return False
        if self.stream is not None:
            for packet in self.stream.encode():  # what the encoder holds back
                self.container.mux(packet)
            self.container.close()  # faststart: moves the index to the front
        else:
            self.writer.release()
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.partial, self.final)
        return True

    def abandon(self) -> None:
        try:
            if self.container is not None:
                self.container.close()
            if self.writer is not None:
                self.writer.release()
        except Exception:  # noqa: BLE001 - the partial file goes anyway
            pass
        if os.path.lexists(self.partial):
            self.partial.unlink()


# --------------------------------------------------------------------------------------------
# the output folder


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


def _read_earlier(out_dir: Path) -> Optional[dict]:
    """The folder's results.json when it is a `persam track` one; None when there is none;
    InputError when it is something else."""
    path = out_dir / RESULTS_FILE
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("format") == TRACK_FORMAT and isinstance(data.get("frames"), list):
        version = data.get("version")
        if not isinstance(version, int) or version > TRACK_VERSION:
            raise InputError(f"{path} was written by a newer persam (track results version {version!r}); "
                             f"upgrade persam or use another --out")
        return data
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        raise InputError(f"{path} holds the results of `persam segment` / `apply`, not of `persam track`; "
                         f"use another --out")
    raise InputError(f"{path} is not a persam results file; refusing to replace it: move it away or use another --out")


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


class _TrackFolder:
    """results.json of a track run: ownership of files, the key, the records (see the module doc)."""

    def __init__(self, out_dir: Path, made_with: dict, header: dict, overwrite: bool,
                 log: Callable[[str], None]) -> None:
        self.out_dir = out_dir
        self.made_with = _strict_json(made_with)
        self.key = settings_key(self.made_with)
        self.header = header
        self.log = log
        earlier = _read_earlier(out_dir)
        self.files = {RESULTS_FILE}
        self.records: Dict[int, dict] = {}
        self.stopped: Optional[dict] = None
        self.overlay: Optional[dict] = None
        if earlier is None:
            return
        self.files |= {f for f in earlier.get("files") or [] if isinstance(f, str) and "/" not in f
                       and os.path.lexists(out_dir / f)}
        same = earlier.get("key") == self.key
        records = [r for r in earlier["frames"] if isinstance(r, dict) and isinstance(r.get("index"), int)]
        if not same and records and not overwrite:
            why = _differences(str(earlier.get("key")), earlier.get("made_with"), self.made_with)
            raise InputError(f"{out_dir} holds `persam track` results made with other settings ({why}); use "
                             f"--overwrite to redo them, or another --out")
        if same and not overwrite:
            self.records = {r["index"]: r for r in records
                            if isinstance(r.get("mask"), str) and r["mask"] in self.files
                            and (out_dir / r["mask"]).is_file()}
            self.stopped = earlier.get("stopped") if isinstance(earlier.get("stopped"), dict) else None
            overlay = earlier.get("overlay")
            if isinstance(overlay, dict) and (overlay.get("frames") == [] or (
                    overlay.get("file") in OVERLAY_FILES and overlay["file"] in self.files
                    and (out_dir / overlay["file"]).is_file())):
                self.overlay = overlay

    def refuse_foreign(self, names: Sequence[str]) -> None:
        for name in names:
            path = self.out_dir / name
            if os.path.lexists(path) and name not in self.files:
                raise InputError(f"{path} was not written by persam (results.json there does not list it); refusing "
                                 f"to replace it: use another --out, or move the file away")

    def claim(self, names: Sequence[str]) -> None:
        """List `names` in results.json before any of them is written (written now when new)."""
        new = [n for n in names if n not in self.files]
        if new:
            self.refuse_foreign(new)
            self.files.update(new)
            self.save()

    def remove_stale(self, keep: Sequence[str]) -> None:
        """--overwrite: remove the files of earlier runs that this run does not write (ours only)."""
        keep = set(keep) | {RESULTS_FILE, LOCK_FILE}
        for name in sorted(self.files - keep):
            path = self.out_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
            self.files.discard(name)

    def save(self, summary: Optional[dict] = None) -> dict:
        records = [self.records[i] for i in sorted(self.records)]
        ids = self.header.get("objects") or []
        found = {str(i): sum(any(o["id"] == i and o["found"] for o in r["objects"]) for r in records) for i in ids}
        times = [r["time_s"] for r in records if not r.get("reference")]
        data = {"format": TRACK_FORMAT, "version": TRACK_VERSION, **self.header, "key": self.key,
                "made_with": self.made_with, "files": sorted(self.files), "overlay": self.overlay,
                "stopped": self.stopped,
                "summary": {"frames": len(records), "found": found,
                            "not_found": {k: len(records) - v for k, v in found.items()},
                            "mean_time_s": round(sum(times) / len(times), 4) if times else None,
                            **(summary or {})},
                "frames": records}
        data = _strict_json(data)
        atomic_write_text(self.out_dir / RESULTS_FILE, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return data


# --------------------------------------------------------------------------------------------
# the run


def _make_tracker(predictor, reference: Reference, options: TrackOptions, out_dir: Path, log):
    """The tracker and, for a reference frame of the video, that frame's result (the reference masks)."""
    from .video import VideoTracker, learn_concepts

    tracker_options = dict(use_previous_box=options.use_previous_box, box_margin=options.box_margin,
                           min_similarity=options.min_similarity)
    if reference.kind == "concept":
        return VideoTracker(predictor, {1: reference.concept}, **tracker_options), None
    encoded = None
    masks = reference.masks
    if masks is None:  # SAM makes the mask of object 1 from the clicks / the box
        from .target import reference_mask_from_prompts

        encoded = (predictor.set_image(reference.image), predictor.original_size)
        mask = reference_mask_from_prompts(predictor, points=reference.points, box=reference.box)
        if mask is None:
            where = f"frame {reference.frame}" if reference.kind == "frame" else "the reference image"
            raise InputError(f"{where}: SAM found no object at the given {'box' if reference.box else 'points'}; "
                             f"give --ref-mask instead")
        atomic_save_png(out_dir / REFERENCE_MASK_FILE, np.asarray(mask, dtype=bool))
        log(f"reference mask made by SAM: {out_dir / REFERENCE_MASK_FILE}")
        masks = reference.masks = {1: np.asarray(mask, dtype=bool)}
    if reference.kind == "image":
        concepts = learn_concepts(predictor, reference.image, masks, options.method, options.finetune, encoded)
        return VideoTracker(predictor, concepts, **tracker_options), None
    tracker, result = VideoTracker.learn(predictor, reference.image, masks, options.method, options.finetune, encoded,
                                         **tracker_options)
    return tracker, result


def _save_mask(path: Path, label_map: np.ndarray, palette: bool) -> None:
    if palette:
        atomic_save_png(path, label_map.astype(np.uint8), palette="davis")
    else:
        atomic_save_png(path, label_map > 0)


def run_track(
    source: FrameSource,
    reference: Reference,
    out_dir,
    predictor_factory: Callable[[], object],
    made_with: dict,
    options: Optional[TrackOptions] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Track the reference's objects through `source` into `out_dir` (see the module doc).

    `predictor_factory` builds the SamPredictor when a frame is to be segmented (not when all is
    done); `made_with` describes what makes the masks besides `options` (the run's key).  Returns
    results.json's content; ``stopped`` is set when the video could not be read to its end."""
    options = options or TrackOptions()
    out_dir = Path(out_dir)
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    if source.kind == "folder" and out_dir.resolve() == source.path.resolve():
        raise InputError(f"--out {out_dir} is the frame folder; write the outputs to another folder")
    if not 0 <= options.start < source.count:
        raise InputError(f"--start {options.start}: {source.path} has {source.count} frames (0..{source.count - 1})")
    stop = source.count if options.end is None else min(options.end, source.count)
    if stop <= options.start:
        raise InputError(f"--end {options.end} must be after --start {options.start}")
    plan = list(range(options.start, stop, options.every))
    ids = reference.ids
    names = {i: _mask_name(i, source.count) for i in plan}
    made_with = dict(made_with, video_sha256=source.fingerprint(), every=options.every, start=options.start,
                     min_similarity=options.min_similarity, method=options.method,
                     use_previous_box=options.use_previous_box, box_margin=options.box_margin)
    fps = source.fps / options.every
    header = {"command": "track", "video": str(source.path), "video_kind": source.kind, "frame_count": source.count,
              "fps": round(source.fps, 4), "overlay_fps": round(fps, 4), "size": list(source.size),
              "objects": ids, "palette_masks": reference.labels, **options.info,
              "reference": reference.describe, "every": options.every, "start": options.start, "end": stop,
              "min_similarity": options.min_similarity}

    overlay_name, not_mp4 = overlay_file_name()
    with output_lock(out_dir):
        folder = _TrackFolder(out_dir, made_with, header, options.overwrite, log)
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
            data = folder.save()
            if folder.stopped:
                log(f"persam: warning: {source.path} stopped at frame {stopped_at} ({folder.stopped.get('reason')}); "
                    f"the {len(reachable)} frame(s) before it are done in {out_dir}")
            else:
                log(f"all {len(plan)} frame(s) already done in {out_dir} (use --overwrite to redo them)")
            return data
        folder.stopped = None
        folder.overlay = None
        folder.claim(outputs)

        done_before = len(reachable) if first_missing is None else first_missing
        if done_before:
            log(f"resuming at frame {plan[done_before] if done_before < len(plan) else plan[-1]}: "
                f"{done_before} frame(s) already done in {out_dir}")
        writer = _OverlayWriter(out_dir, overlay_name, fps, source.size)
        if not_mp4:
            log(f"persam: note: the overlay video is {overlay_name} ({writer.codec.upper()}: browsers play it, some "
                f"players do not) as {not_mp4}; pip install av for {OVERLAY_FILE} (H.264)")
        tracker, reference_result = None, None
        previous = None  # label map of the previous processed frame, or the reference masks
        bar = None
        written: List[int] = []
        run_frames, run_start = 0, None
        last_save = time.monotonic()
        complete = False
        try:
            try:
                for position, (index, frame) in enumerate(source.frames(plan)):
                    if position < done_before:  # done earlier: into the overlay again, from its mask
                        record = folder.records[index]
                        label_map = load_label_map(out_dir / record["mask"])
                        found = {o["id"]: bool(o["found"]) for o in record["objects"]}
                        writer.write(overlay_frame(frame, label_map, ids, found, record.get("reference", False)))
                        written.append(index)
                        ref_masks = reference.masks if record.get("reference") else None
                        previous = ref_masks if ref_masks is not None else label_map
                        continue
                    if tracker is None:
                        predictor = predictor_factory()
                        run_start = time.perf_counter()  # the frames/s count learning, not building the model
                        tracker, reference_result = _make_tracker(predictor, reference, options, out_dir, log)
                        tracker.restart(previous)
                        bar = tqdm(total=len(plan), initial=position, desc="tracking", unit=" frames", file=sys.stderr,
                                   bar_format=BAR_FORMAT,
                                   disable=(not options.progress) if options.progress is not None else None)
                    if reference.kind == "frame" and index == reference.frame:
                        result = reference_result
                        tracker.restart(reference.masks)
                    else:
                        result = tracker.track(frame)
                    _save_mask(out_dir / names[index], result.label_map, reference.labels)
                    folder.records[index] = _record(index, names[index], result, ids)
                    found = {i: o.found for i, o in result.objects.items()}
                    writer.write(overlay_frame(frame, result.label_map, ids, found, result.reference))
                    written.append(index)
                    run_frames += 1
                    bar.update(1)
                    if time.monotonic() - last_save >= SAVE_EVERY_S:
                        folder.save()
                        last_save = time.monotonic()
            except FrameStop as halt:
                folder.stopped = {"frame": halt.index, "reason": halt.reason}
            if bar is not None:
                bar.close()
            made = writer.finish()
            complete = True
            folder.overlay = {"file": overlay_name if made else None, "codec": writer.codec if made else None,
                              "size": list(writer.size), "frames": written}
            for name in OVERLAY_FILES + tuple(map(partial_overlay_name, OVERLAY_FILES)):
                if name != folder.overlay["file"] and name in folder.files:  # renamed, or an earlier run's other one
                    path = out_dir / name
                    if path.is_file() and not path.is_symlink():
                        path.unlink()
                    folder.files.discard(name)
        finally:
            if not complete:
                writer.abandon()
                if bar is not None:
                    bar.close()
            seconds = (time.perf_counter() - run_start) if run_start is not None else 0.0
            summary = {"this_run": {"frames": run_frames, "seconds": round(seconds, 3),
                                    "frames_per_second": round(run_frames / seconds, 4) if seconds > 0 else None}}
            data = folder.save(summary)
    if folder.stopped:
        log(f"persam: warning: {source.path}: stopped at frame {folder.stopped['frame']} "
            f"({folder.stopped['reason']}); the {len(written)} frame(s) before it are kept in {out_dir}")
    return data


# --------------------------------------------------------------------------------------------
# the command


def track_command(args) -> int:
    """``persam track``: the command (persam.cli registers it).  0 done; 1 the video stopped early."""
    from .finetune import FinetuneSettings
    from .models import DEFAULT_MODEL, build_predictor, resolve_checkpoint
    from .run import file_sha256

    if getattr(args, "format", "png") == "coco":
        from .coco import require_pycocotools

        require_pycocotools()  # before any work
    source = open_video(args.video, fps=args.fps)
    if args.fps is not None and source.kind == "video":
        print(f"persam: note: --fps is for a folder of frames; {source.path} keeps its own {source.fps:g} fps",
              file=sys.stderr)
    reference = read_reference(args, source)
    concept = reference.concept
    model_type = args.model or getattr(concept, "model_type", None) or DEFAULT_MODEL
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)
    if reference.kind == "concept":
        from .concept import load_concept

        reference.concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256)
        method = reference.concept.method
    else:
        method = "persam_f" if args.finetune else "persam"
    finetune = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    made_with = {
        "reference": reference.content,
        "finetune": {"steps": args.steps, "resolution": args.finetune_resolution} if args.finetune else None,
        "model_type": model_type, "checkpoint_sha256": checkpoint_sha256, "precision": args.precision,
    }
    options = TrackOptions(
        every=args.every, start=args.start, end=args.end, min_similarity=args.min_similarity,
        overwrite=args.overwrite, progress=False if args.quiet else None, method=method, finetune=finetune,
        info={"method": method, "model_type": model_type, "checkpoint": str(checkpoint)},
    )
    backend = getattr(args, "backend", "auto")

    def predictor_factory():
        return build_predictor(model_type, checkpoint, args.device, args.precision, backend)

    out_dir = Path(args.out)
    data = run_track(source, reference, out_dir, predictor_factory, made_with, options,
                     log=lambda line: tqdm.write(line, file=sys.stderr))
    if getattr(args, "format", "png") == "coco":  # OUT/coco.json: frames as images (persam.coco)
        from .coco import write_track_coco

        name = getattr(reference.concept, "name", None) or Path(args.concept or args.video).stem
        data = write_track_coco(out_dir, data, name, source.files)
    summary = data["summary"]
    run = summary.get("this_run") or {}
    found = ", ".join(f"{'object ' + k if len(summary['found']) > 1 else 'the object'} found in {v}/{summary['frames']}"
                      for k, v in summary["found"].items())
    overlay_file = (data.get("overlay") or {}).get("file") or "(none: no frame)"
    if run.get("frames"):
        print(f"{run['frames']} frame(s) tracked in {run['seconds']:.1f} s ({run['frames_per_second']:.2f} frames/s); "
              f"{found} frames; results in {out_dir / RESULTS_FILE}, overlay {out_dir / overlay_file}",
              file=sys.stderr)
    return 1 if data.get("stopped") else 0
