"""The overlay video of `persam track`: each processed frame with the objects tinted
(:func:`overlay_frame`), written as overlay.mp4 (H.264 through PyAV's libx264, which browsers play)
or, where PyAV cannot write H.264, as overlay.webm (VP9, else VP8, through OpenCV)
(:func:`overlay_file_name`, :class:`OverlayWriter`).  The video is written under a temporary name
(.overlay.partial.mp4) and renamed when complete.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from persam.errors import InputError
from persam.data.io import davis_palette

__all__ = ["OVERLAY_FILE", "WEBM_OVERLAY_FILE", "OVERLAY_FILES", "PLAYABLE_CODECS", "OverlayWriter",
           "overlay_file_name", "overlay_frame", "partial_overlay_name"]

OVERLAY_FILE = "overlay.mp4"  # H.264 (PyAV's libx264); where PyAV has no H.264 encoder, WEBM_OVERLAY_FILE
WEBM_OVERLAY_FILE = "overlay.webm"  # VP9 (else VP8) through OpenCV's FFmpeg
OVERLAY_FILES = (OVERLAY_FILE, WEBM_OVERLAY_FILE)
PLAYABLE_CODECS = ("h264", "vp9", "vp8")  # an overlay recorded with another codec (or none: mp4v) is written again
H264_ENCODER = "libx264"
WEBM_FOURCCS = (("VP90", "vp9"), ("VP80", "vp8"))  # OpenCV's, tried in this order


def overlay_frame(frame: np.ndarray, label_map: np.ndarray, ids: Sequence[int], found: Dict[int, bool],
                  reference: bool = False) -> np.ndarray:
    """`frame` (RGB uint8) with each object tinted in its id's DAVIS palette colour and outlined;
    a red frame and "not found" where an object is absent; "reference" on the reference frame
    (drawn by persam.data.visualize, as the overlays of `persam segment`)."""
    from persam.data import visualize

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


class OverlayWriter:
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
