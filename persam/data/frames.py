"""The frames of the user's video: a video file (what OpenCV reads: mp4, mov, avi, mkv, ...) or a
folder of frames (its images sorted by name, numbers in names compared as numbers), read in order.

:func:`open_video` opens one (InputError, one line, when it cannot be read at all);
:class:`FrameSource` reads its frames; :class:`FrameStop` is raised at the first frame that cannot be
read on (truncated, corrupt, a frame of another size).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from persam.errors import InputError
from persam.data.io import load_image
from persam.data.listing import IMAGE_EXTENSIONS

__all__ = ["DEFAULT_FPS", "FrameSource", "FrameStop", "open_video"]

DEFAULT_FPS = 24.0  # of a folder of frames (DAVIS's)


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
