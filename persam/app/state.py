"""What the page does, without HTTP: one shared model, one :class:`Session` per browser.

* **One model, one lock.**  The SAM model is loaded once (:class:`AppState`).  Every browser
  session works through its own :class:`SessionPredictor`, a view of the shared predictor with its
  own current image; the model's forward calls (encode, decode) are serialised by one lock, since
  torch modules are not meant for concurrent forwards.
* **Encode once.**  Image embeddings are kept in :class:`EmbeddingCache`, a least-recently-used
  cache bounded in entries (4 MiB each) and shared by all sessions under per-session keys.  A click
  on the reference, a new method or threshold only decodes; an image is encoded again only after
  its embedding was evicted.
* **Sessions never mix.**  Each session keeps its uploads in its own folder (bounded in bytes)
  and looks its images up by random ids in its own tables.  A session is made only when a person
  starts one (:meth:`AppState.new_session`, the server's first state-changing request); the
  sessions are bounded, and a new one replaces the least recently used session that has been idle
  for a while (its folder removed), never one that is working: the app refuses the new one
  instead (:class:`AppFull`).
* **Nothing is decoded that is too large.**  Every uploaded or server-side image (reference,
  mask, target) has its size read from its header and checked against ``max_megapixels`` before
  it is decoded (:func:`check_pixels`).
* **The method is persam's.**  Clicks go through :func:`persam.target.reference_mask_from_prompts`,
  learning through :func:`persam.pipeline.learn_concept`, targets through
  :func:`persam.pipeline.segment` / :func:`persam.multi.segment_objects`, heat maps through
  :mod:`persam.locate` and :mod:`persam.visualize`, concept files through :mod:`persam.concept`, and
  the zip is written by :class:`persam.run.OutputFolder`, as ``persam apply`` writes its folder.

Every problem with the user's input raises :class:`~persam.io.InputError` (one line naming the
user's file, never a server path); :class:`NotFound` is an unknown id.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from sam.predictor import ImageEmbedding, SamPredictor

from ..io import InputError, check_reference_mask, load_image, load_mask
from ..sources import ExpansionLimits

__all__ = [
    "AppConfig",
    "AppFull",
    "AppState",
    "EmbeddingCache",
    "NotFound",
    "Session",
    "SessionPredictor",
    "check_pixels",
]

EMBEDDING_MIB = 4  # one 1 x 256 x 64 x 64 fp32 embedding
MAX_REFERENCES = 8
MAX_TARGETS = 500
MAX_CLICKS = 64
PREVIEW_SIDE = 1024  # the reference as the page shows it (clicks are mapped back to full size)
GALLERY_SIDE = 768  # overlays and heat maps in the gallery
THUMB_SIDE = 160
FOLDER_LIMITS = ExpansionLimits(max_entries=200_000, max_seconds=30.0)  # a person waits for a server folder's listing
CONCEPT_IN_ZIP = "reference.concept"


class NotFound(KeyError):
    """An id that this session does not have (never had, removed, or the session expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument
        return str(self.args[0]) if self.args else "not found"


class AppFull(RuntimeError):
    """No room for a new session: every session the app keeps is working or was used recently."""


class SessionClosed(RuntimeError):
    """The session was evicted (or the app stopped) while a request of it waited for its turn."""


@dataclass
class AppConfig:
    model_type: str
    checkpoint: Optional[Path] = None  # its sha256 is recorded in concepts and results.json
    precision: str = "fp32"
    max_sessions: int = 8
    max_embeddings: int = 48  # x 4 MiB
    max_megapixels: float = 50.0
    max_upload_mb: float = 64.0  # one file (a request's body may be 1 MiB more, for the form around it)
    max_session_mb: float = 1024.0  # the uploads a session keeps on disk, all together
    session_idle_s: float = 600.0  # a session used more recently than this is never replaced by a new one
    allow_folders: bool = False  # read target images from a folder on the server
    work_dir: Optional[Path] = None  # uploads go below it (default: a new temporary folder)

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_embeddings < 1:
            raise ValueError("max_sessions and max_embeddings must be at least 1")
        if not (self.max_megapixels > 0 and self.max_upload_mb > 0 and self.max_session_mb > 0):
            raise ValueError("max_megapixels, max_upload_mb and max_session_mb must be positive")
        if not self.session_idle_s >= 0:
            raise ValueError("session_idle_s must be at least 0")


# --------------------------------------------------------------------------------------------
# the shared model and the embeddings


class EmbeddingCache:
    """Image embeddings by key, least recently used first out, at most `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: "OrderedDict[Tuple[str, str], ImageEmbedding]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Tuple[str, str]) -> Optional[ImageEmbedding]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Tuple[str, str], embedding: ImageEmbedding) -> None:
        with self._lock:
            self._items[key] = embedding
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == session_id]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


class SharedModel:
    """The one predictor of the app and the lock that serialises its forward calls."""

    def __init__(self, predictor: SamPredictor) -> None:
        if hasattr(predictor, "prepare"):
            predictor.prepare()  # build the encoder once, before the sessions' views share it
        self.predictor = predictor
        self.lock = threading.RLock()
        self.encodes = 0  # images encoded since the start (for tests and the status line)


def pixels_key(image: np.ndarray) -> str:
    """A content key of an RGB image: equal pixels, equal key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class SessionPredictor:
    """A session's view of the shared predictor: its own current image, the shared model.

    Duck-types :class:`~sam.predictor.SamPredictor` for persam's method steps.  Encoding goes
    through the embedding cache (:meth:`select`, and :meth:`set_image` by pixel content), and
    every model call holds the shared lock."""

    def __init__(self, shared: SharedModel, cache: EmbeddingCache, session_id: str) -> None:
        view = copy.copy(shared.predictor)  # shares the model and the encoder, not the current image
        view.reset_image()
        self._view = view
        self._shared = shared
        self._cache = cache
        self._session_id = session_id
        self.encodes = 0  # images this session encoded

    def __getattr__(self, name):  # features, original_size, input_size, model, set_embedding, ...
        return getattr(self._view, name)

    def select(self, key: str, load: Callable[[], np.ndarray]) -> bool:
        """Make the image of content `key` current: its cached embedding, else encode `load()`.
        True when it was encoded."""
        embedding = self._cache.get((self._session_id, key))
        if embedding is not None:
            self._view.set_embedding(*embedding)
            return False
        image = load()
        with self._shared.lock:
            features = self._view.set_image(image)
            self._shared.encodes += 1
        self.encodes += 1
        self._cache.put((self._session_id, key), ImageEmbedding(features, self._view.original_size, self._view.input_size))
        return True

    def embedding(self, key: str, load: Callable[[], np.ndarray]) -> ImageEmbedding:
        self.select(key, load)
        return ImageEmbedding(self._view.features, self._view.original_size, self._view.input_size)

    def set_image(self, image: np.ndarray):
        """As SamPredictor.set_image, from the cache when these pixels were encoded before."""
        self.select(pixels_key(image), lambda: image)
        return self._view.features

    def encode_images(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.encode_images(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict(*args, **kwargs)

    def predict_torch(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict_torch(*args, **kwargs)

    def predict_each(self, *args, **kwargs):
        with self._shared.lock:
            return self._view.predict_each(*args, **kwargs)

    def upscale(self, low_res):
        with self._shared.lock:
            return self._view.upscale(low_res)

    def upscale_image(self, image, low_res):
        with self._shared.lock:
            return self._view.upscale_image(image, low_res)


# --------------------------------------------------------------------------------------------
# images of a session


@dataclass
class Item:
    """An image of the session: a reference or a target."""

    id: str
    name: str  # the user's file name (or the path, for a folder target)
    path: Path  # where the pixels are read from
    width: Optional[int] = None
    height: Optional[int] = None
    key: Optional[str] = None  # pixels_key, once the image was read
    uploaded: bool = True  # False: a file in a folder on the server (read where it is)
    sha256: Optional[str] = None  # of the file (uploads: when stored; folder files: when first segmented)

    def info(self) -> dict:
        return {"id": self.id, "name": self.name, "width": self.width, "height": self.height}


@dataclass
class Reference(Item):
    preview: bytes = b""  # JPEG, longest side at most PREVIEW_SIDE
    preview_size: Tuple[int, int] = (0, 0)  # width, height
    points: List[Tuple[float, float, int]] = field(default_factory=list)  # x, y, label
    box: Optional[Tuple[float, float, float, float]] = None
    mask: Optional[np.ndarray] = None  # H x W bool
    mask_source: Optional[str] = None  # "clicks", "box" or "file"
    mask_png: str = ""  # data URL of the mask at preview size
    version: int = 0  # changes with the mask

    def info(self) -> dict:
        out = super().info()
        out.update(
            preview=f"/api/references/{self.id}/image.jpg", preview_width=self.preview_size[0],
            preview_height=self.preview_size[1], points=[list(p) for p in self.points],
            box=list(self.box) if self.box else None, mask_source=self.mask_source,
            mask=self.mask_png or None, area=int(self.mask.sum()) if self.mask is not None else 0,
        )
        return out


@dataclass
class Drawing:
    """What the overlay of a target's last result shows, at the image's full size: its masks
    (PNG bytes, a few kB each, not H x W arrays kept for every target), prompt points and boxes."""

    masks: List[bytes]
    points: np.ndarray  # N x 2
    labels: np.ndarray  # N
    boxes: np.ndarray  # M x 4

    def picture(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The overlay over `image` (the target scaled by `scale`)."""
        from .. import visualize

        size = (image.shape[1], image.shape[0])
        masks = [_shrink_mask(cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_GRAYSCALE) > 0, size)
                 for m in self.masks]
        return visualize.overlay(image, masks, self.points * scale if len(self.points) else None,
                                 self.labels if len(self.labels) else None,
                                 self.boxes * scale if len(self.boxes) else None)


@dataclass
class Target(Item):
    thumb: bytes = b""  # JPEG, THUMB_SIDE
    result: Optional[dict] = None
    overlay: bytes = b""  # JPEG of the last result, GALLERY_SIDE
    drawing: Optional[Drawing] = None  # the last result, for the full-size overlay
    version: int = 0

    def info(self) -> dict:
        out = super().info()
        out.update(thumb=f"/api/targets/{self.id}/thumb.jpg" if self.thumb else None, result=self.result)
        return out


def _safe_name(filename: Optional[str], default: str = "image") -> str:
    """A file name safe to write: no folders, plain characters, at most 100 of them."""
    name = Path(str(filename or "").replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(" .")
    return (name or default)[-100:]


def _jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB picture
        raise RuntimeError("cannot encode a JPEG")
    return buffer.tobytes()


def _png(picture: np.ndarray) -> bytes:
    if picture.ndim == 3 and picture.shape[2] == 3:
        picture = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    elif picture.ndim == 3 and picture.shape[2] == 4:
        picture = cv2.cvtColor(picture, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(".png", picture)
    if not ok:  # pragma: no cover
        raise RuntimeError("cannot encode a PNG")
    return buffer.tobytes()


def _fit(width: int, height: int, side: int) -> Tuple[float, int, int]:
    """Scale (at most 1) and size that fit width x height into side x side."""
    scale = min(1.0, side / max(width, height))
    return scale, max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(image: np.ndarray, side: int) -> Tuple[np.ndarray, float]:
    height, width = image.shape[:2]
    scale, w, h = _fit(width, height, side)
    if scale == 1.0:
        return image, 1.0
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA), scale


def _shrink_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """An H x W bool mask at `size` (width, height)."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def _mask_data_url(mask: np.ndarray, size: Tuple[int, int]) -> str:
    """The mask at `size` as a translucent blue PNG with a solid outline (a data URL for the page)."""
    small = _shrink_mask(mask, size)
    rgba = np.zeros((*small.shape, 4), np.uint8)
    rgba[small] = (30, 144, 255, 110)
    contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(rgba, contours, -1, (255, 255, 255, 255), max(1, round(max(size) / 400)))
    return "data:image/png;base64," + base64.b64encode(_png(rgba)).decode("ascii")


def check_pixels(path: Path, name: str, limit_megapixels: float) -> None:
    """InputError when the image at `path` is over `limit_megapixels`, from its header alone
    (Pillow's lazy open reads the size, not the pixels).  A file Pillow cannot open passes:
    loading it fails later with the loader's own message (and decodes nothing)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the app's
            with Image.open(path) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        raise InputError(f"{name}: the image is far too large (over {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} "
                         f"megapixels; the app accepts at most {limit_megapixels:g})") from None
    except Exception:  # not an image: the loader says so in its words
        return
    if width * height > limit_megapixels * 1e6:
        raise InputError(f"{name}: the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), larger than "
                         f"the app's limit of {limit_megapixels:g} megapixels; downscale it first")


def _rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


@dataclass
class Settings:
    """How targets are segmented (the page's method panel; the method itself is the concept's)."""

    multi: bool = False
    max_objects: int = 5
    min_similarity: Optional[float] = None

    @classmethod
    def parse(cls, data: Optional[dict]) -> "Settings":
        from ..run import MAX_LABELS

        data = data or {}
        multi = data.get("multi", False)
        if not isinstance(multi, bool):  # bool("false") is True: a string is not read as a yes
            raise InputError(f"multi must be true or false, not {multi!r}")
        try:
            max_objects = int(data.get("max_objects", 5))
        except (TypeError, ValueError):
            raise InputError(f"max objects must be a whole number, not {data.get('max_objects')!r}") from None
        if not 1 <= max_objects <= MAX_LABELS:
            raise InputError(f"max objects must be between 1 and {MAX_LABELS}, not {max_objects}")
        threshold = data.get("min_similarity")
        if threshold is not None and threshold != "":
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                threshold = math.nan
            if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
                raise InputError(f"min similarity must be a cosine between -1 and 1, not {data.get('min_similarity')!r}")
        else:
            threshold = None
        return cls(multi, max_objects, threshold)


# --------------------------------------------------------------------------------------------
# one browser session


class Session:
    """One browser's references, targets, concept and results; its files in its own folder."""

    def __init__(self, app: "AppState", session_id: str) -> None:
        self.app = app
        self.id = session_id
        self.dir = Path(tempfile.mkdtemp(prefix="session-", dir=app.work_dir))
        self.lock = threading.RLock()  # one request of the session at a time
        self.closed = False  # evicted (or the app stopped): its requests are refused, its folder is gone
        self.active = 0  # requests of this session in progress (or waiting for the lock)
        self.last_used = time.monotonic()
        self.predictor = SessionPredictor(app.model, app.embeddings, session_id)
        self.references: "OrderedDict[str, Reference]" = OrderedDict()
        self.targets: "OrderedDict[str, Target]" = OrderedDict()
        self.concept = None
        self.concept_source: Optional[str] = None  # "references" or the loaded file's name
        self.concept_key = None  # what the concept was learned from
        self.concept_name = "concept"

    def close(self) -> None:
        """Remove the session's files (the caller holds its lock, or the app is stopping)."""
        self.closed = True
        shutil.rmtree(self.dir, ignore_errors=True)

    def begin(self) -> None:
        """A request of this session starts: it is working (never replaced by a new session)."""
        self.active += 1
        self.last_used = time.monotonic()

    def end(self) -> None:
        self.active -= 1
        self.last_used = time.monotonic()

    def working(self, idle_s: float, now: Optional[float] = None) -> bool:
        """True while a request of it runs or waits, and for `idle_s` seconds after its last one."""
        now = time.monotonic() if now is None else now
        return self.active > 0 or now - self.last_used < idle_s

    def is_empty(self) -> bool:
        return not self.references and not self.targets and self.concept is None

    def run(self, work: Callable[["Session"], object]):
        """work(self) under the session's lock; SessionClosed when it was evicted meanwhile."""
        with self.lock:
            if self.closed:
                raise SessionClosed(self.id)
            return work(self)

    def disk_bytes(self) -> int:
        """Bytes of the files in the session's folder."""
        total = 0
        for root, _, files in os.walk(self.dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
        return total

    # uploads

    def _new_id(self) -> str:
        return secrets.token_hex(8)

    def _store(self, kind: str, filename: Optional[str], stream) -> Tuple[Path, str, str]:
        """Copy an upload into the session folder (at most max_upload_mb, and the session's files
        together at most max_session_mb); its path, safe name and sha256."""
        config = self.app.config
        name = _safe_name(filename)
        room = int(config.max_session_mb * 2**20) - self.disk_bytes()
        limit = min(int(config.max_upload_mb * 2**20), room)
        session_full = InputError(
            f"{name}: this session already keeps {(int(config.max_session_mb * 2**20) - room) / 2**20:.0f} MB of "
            f"uploads, and the app keeps at most {config.max_session_mb:g} MB per session; remove some images first "
            f"(or use `persam segment` for large batches)")
        if room <= 0:
            raise session_full
        (self.dir / kind).mkdir(exist_ok=True)  # not parents: an evicted session's folder is not made again
        folder = self.dir / kind / self._new_id()
        folder.mkdir()
        path = folder / name
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as out:
            while True:
                chunk = stream.read(2**20)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    out.close()
                    shutil.rmtree(folder, ignore_errors=True)
                    if limit == room:
                        raise session_full
                    raise InputError(f"{name}: larger than the app's upload limit of {config.max_upload_mb:g} MB")
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise InputError(f"{name}: the file is empty")
        return path, name, digest.hexdigest()

    def _read_image(self, path: Path, name: str) -> np.ndarray:
        """Load an image the way the command line does, after checking its size in the header."""
        check_pixels(path, name, self.app.config.max_megapixels)
        try:
            image = load_image(path)
        except InputError as exc:
            raise InputError(str(exc).replace(str(path), name)) from None
        return image if image.flags.writeable else image.copy()

    def _ingest(self, kind: str, filename: Optional[str], stream) -> Tuple[Path, str, str, np.ndarray]:
        path, name, sha256 = self._store(kind, filename, stream)
        try:
            return path, name, sha256, self._read_image(path, name)
        except BaseException:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise

    # references

    def reference(self, ref_id: str) -> Reference:
        ref = self.references.get(ref_id)
        if ref is None:
            raise NotFound(f"no reference {ref_id} in this session (removed, or the session expired: reload the page)")
        return ref

    def add_reference(self, filename: Optional[str], stream) -> dict:
        """Upload a reference image; it is encoded now, so that clicks only decode."""
        if len(self.references) >= MAX_REFERENCES:
            raise InputError(f"at most {MAX_REFERENCES} reference images; remove one first")
        path, name, sha256, image = self._ingest("references", filename, stream)
        height, width = image.shape[:2]
        preview, _ = _shrink(image, PREVIEW_SIDE)
        ref = Reference(self._new_id(), name, path, width, height, pixels_key(image), sha256=sha256,
                        preview=_jpeg(preview, 90), preview_size=(preview.shape[1], preview.shape[0]))
        start = time.perf_counter()
        encoded = self.predictor.select(ref.key, lambda: image)
        self.references[ref.id] = ref
        out = ref.info()
        out.update(encoded=encoded, encode_s=round(time.perf_counter() - start, 3))
        return out

    def remove_reference(self, ref_id: str) -> None:
        ref = self.reference(ref_id)
        del self.references[ref_id]
        shutil.rmtree(ref.path.parent, ignore_errors=True)

    def _load_reference(self, ref: Reference) -> Callable[[], np.ndarray]:
        return lambda: self._read_image(ref.path, ref.name)

    def set_prompts(self, ref_id: str, points: Sequence, box: Optional[Sequence]) -> dict:
        """Clicks ([x, y, label], label 1 on the object, 0 on the background) or a box on a
        reference, in its pixels; SAM's mask from the reference's cached embedding.  No prompts
        clears the mask.  On failure the reference keeps its earlier prompts and mask."""
        ref = self.reference(ref_id)
        points, box = self._check_prompts(ref, points, box)
        start = time.perf_counter()
        encoded = False
        if not points and box is None:
            mask = None
        else:
            from ..target import reference_mask_from_prompts

            encoded = self.predictor.select(ref.key, self._load_reference(ref))
            if box is not None:
                mask = reference_mask_from_prompts(self.predictor, box=np.asarray(box, np.float32))
            else:
                coords = np.asarray([p[:2] for p in points], np.float32)
                labels = np.asarray([p[2] for p in points], np.int64)
                mask = reference_mask_from_prompts(self.predictor, points=coords, labels=labels)
            if mask is None:
                what = "box" if box is not None else "clicks"
                raise InputError(f"SAM found no object at these {what} (each mask it proposed was empty or the whole "
                                 f"image): click elsewhere, add a click, draw a box or upload a mask")
        ref.points, ref.box = points, box
        self._set_mask(ref, mask, None if mask is None else ("box" if box is not None else "clicks"))
        out = ref.info()
        out.update(encoded=encoded, decode_s=round(time.perf_counter() - start, 3))
        return out

    def _check_prompts(self, ref: Reference, points, box):
        if points is None:
            points = []
        if not isinstance(points, (list, tuple)) or len(points) > MAX_CLICKS:
            raise InputError(f"clicks must be a list of at most {MAX_CLICKS} [x, y, label]")
        checked = []
        for p in points:
            try:
                x, y, label = float(p[0]), float(p[1]), int(p[2])
            except (TypeError, ValueError, IndexError):
                raise InputError(f"a click must be [x, y, label], not {p!r}") from None
            if label not in (0, 1):
                raise InputError(f"a click's label is 1 (object) or 0 (background), not {label}")
            if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < ref.width and 0 <= y < ref.height):
                raise InputError(f"click ({x:g}, {y:g}) is outside the reference {ref.name} ({ref.width}x{ref.height})")
            checked.append((round(x, 2), round(y, 2), label))
        if checked and not any(label == 1 for _, _, label in checked):
            raise InputError("add a click on the object: background clicks alone do not say what to segment")
        if box is not None:
            if checked:
                raise InputError("give clicks or a box, not both: the box replaces the clicks")
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise InputError(f"a box is [x0, y0, x1, y1], not {box!r}") from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
                raise InputError(f"the box {box!r} is empty or invalid")
            if x0 < 0 or y0 < 0 or x1 > ref.width or y1 > ref.height:
                raise InputError(f"the box {box!r} is outside the reference {ref.name} ({ref.width}x{ref.height})")
            box = (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2))
        return checked, box

    def set_mask_file(self, ref_id: str, filename: Optional[str], stream) -> dict:
        """The reference's mask from a file (as --ref-mask): same size as the image, not empty, not full."""
        ref = self.reference(ref_id)
        path, name, _ = self._store("masks", filename, stream)
        try:
            check_pixels(path, name, self.app.config.max_megapixels)  # before the mask is decoded
            mask = load_mask(path, (ref.height, ref.width))
            mask = check_reference_mask(mask, name)
        except InputError as exc:
            message = str(exc).replace(str(path), name)
            if "but its image is" in message:
                message += f" (the reference {ref.name})"
            raise InputError(message) from None
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        ref.points, ref.box = [], None
        self._set_mask(ref, mask, "file")
        return ref.info()

    def _set_mask(self, ref: Reference, mask: Optional[np.ndarray], source: Optional[str]) -> None:
        ref.mask, ref.mask_source = mask, source
        ref.mask_png = _mask_data_url(mask, ref.preview_size) if mask is not None else ""
        ref.version += 1

    # the concept

    def learn(self, method: str = "persam", steps: int = 1000) -> dict:
        """Learn the concept from every reference that has a mask (kept while nothing changed)."""
        from ..finetune import FinetuneSettings
        from ..pipeline import METHODS, learn_concept

        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if not isinstance(steps, int) or not 1 <= steps <= 100_000:
            raise InputError(f"PerSAM-F steps must be between 1 and 100000, not {steps!r}")
        refs = [r for r in self.references.values() if r.mask is not None]
        if not refs:
            raise InputError("no reference has a mask yet: click on the object in a reference image, draw a box "
                             "around it, or upload its mask (or load a concept file)")
        key = (method, steps if method == "persam_f" else None, tuple((r.id, r.version) for r in refs))
        start = time.perf_counter()
        learned = key != self.concept_key or self.concept is None
        if learned:
            encoded = [tuple(self.predictor.embedding(r.key, self._load_reference(r)))[:2] for r in refs]
            pairs = [(self._read_image(r.path, r.name), r.mask) for r in refs]
            settings = FinetuneSettings(steps=steps) if method == "persam_f" else None
            self.concept = learn_concept(self.predictor, pairs, method=method, finetune=settings, encoded=encoded)
            self.concept_key, self.concept_source = key, "references"
            self.concept_name = Path(refs[0].name).stem or "concept"
            if getattr(self.concept, "name", None) is None:
                self.concept.name = self.concept_name  # what the object is called, kept in the concept file
        out = self.concept_info()
        out.update(learned=learned, learn_s=round(time.perf_counter() - start, 3))
        return out

    def concept_info(self) -> Optional[dict]:
        if self.concept is None:
            return None
        refs = sum(r.mask is not None for r in self.references.values())
        return {"method": self.concept.method, "source": self.concept_source,
                "references": refs if self.concept_source == "references" else None,
                "file": f"{self.concept_name}.concept"}

    def _require_concept(self):
        if self.concept is None:
            raise InputError("nothing learned yet: mark the object in a reference image and run (or load a concept file)")
        return self.concept

    def concept_bytes(self) -> Tuple[str, bytes]:
        """The concept file (as `persam learn` writes it): file name and bytes."""
        from ..concept import save_concept

        concept = self._require_concept()
        path = self.dir / "concept-out" / f"{self._new_id()}.concept"
        save_concept(concept, path, model_type=self.app.config.model_type, checkpoint_sha256=self.app.checkpoint_sha256())
        try:
            return f"{self.concept_name}.concept", path.read_bytes()
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    def load_concept(self, filename: Optional[str], stream) -> dict:
        """A concept file from `persam learn` or this page; refused when learned with another model."""
        from ..concept import load_concept

        path, name, _ = self._store("concepts", filename, stream)
        try:
            concept = load_concept(path, model_type=self.app.config.model_type,
                                   checkpoint_sha256=self.app.checkpoint_sha256())
        except InputError as exc:
            raise InputError(str(exc).replace(str(path), name)) from None
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        self.concept, self.concept_source, self.concept_key = concept, name, None
        self.concept_name = Path(name).stem or "concept"
        return self.concept_info()

    # targets

    def target(self, target_id: str) -> Target:
        t = self.targets.get(target_id)
        if t is None:
            raise NotFound(f"no target {target_id} in this session (removed, or the session expired: reload the page)")
        return t

    def _room_for_targets(self, count: int = 1) -> None:
        if len(self.targets) + count > MAX_TARGETS:
            raise InputError(f"at most {MAX_TARGETS} target images per session ({len(self.targets)} already); "
                             f"remove some, or use `persam segment` for large batches")

    def add_target(self, filename: Optional[str], stream) -> dict:
        """Upload a target image (checked now; encoded when it is first segmented)."""
        self._room_for_targets()
        path, name, sha256, image = self._ingest("targets", filename, stream)
        thumb, _ = _shrink(image, THUMB_SIDE)
        t = Target(self._new_id(), name, path, image.shape[1], image.shape[0], pixels_key(image), sha256=sha256,
                   thumb=_jpeg(thumb, 80))
        self.targets[t.id] = t
        return t.info()

    def add_folder(self, folder: str) -> Tuple[List[dict], List[str]]:
        """Every image in a folder (or glob pattern) on the server, read where it is when segmented;
        and the expansion's notes.  Expanded as the command line expands a SOURCE
        (:func:`persam.sources.expand_targets`: no folder listed twice, only regular files, bounded
        by FOLDER_LIMITS with a message naming the pattern)."""
        from ..sources import expand_targets, is_uri

        if not self.app.config.allow_folders:
            raise InputError("reading folders on the server is off (start the app with --allow-folders to allow "
                             "it); upload the images instead")
        folder = str(folder or "").strip()
        if not folder:
            raise InputError("give a folder path on the server")
        if is_uri(folder):
            raise InputError(f"{folder}: the page reads folders on the server, not URIs; use `persam segment` "
                             f"or `persam apply` for those")
        found, notes = expand_targets([folder], FOLDER_LIMITS)
        paths = [p for p in found if p.is_file()]
        if not paths:
            if found and not any(p.exists() for p in found):
                raise InputError(f"{folder}: no such file or folder on the server")
            raise InputError(notes[0] if notes else f"{folder}: no image files there")
        self._room_for_targets(len(paths))
        added = []
        for p in paths:
            t = Target(self._new_id(), str(p), p, uploaded=False)
            self.targets[t.id] = t
            added.append(t.info())
        return added, [str(n) for n in notes]

    def remove_target(self, target_id: str) -> None:
        t = self.target(target_id)
        del self.targets[target_id]
        if t.uploaded:
            shutil.rmtree(t.path.parent, ignore_errors=True)

    def clear_targets(self) -> None:
        for target_id in list(self.targets):
            self.remove_target(target_id)

    def _load_target(self, t: Target) -> np.ndarray:
        image = self._read_image(t.path, t.name)
        if t.key is None or t.width is None:
            t.key, t.width, t.height = pixels_key(image), image.shape[1], image.shape[0]
        return image

    def _concept_references(self) -> List[Reference]:
        """The references the concept was learned from (none for a loaded concept file)."""
        if self.concept_source != "references":
            return []
        return [r for r in self.references.values() if r.mask is not None]

    def _is_reference(self, t: Target) -> bool:
        """True when the target is one of the concept's reference images: the same file or the same
        content (sha256), as the command line skips it (persam.run's reference_images)."""
        refs = self._concept_references()
        if not refs:
            return False
        if t.sha256 is None and not t.uploaded:
            from ..run import file_sha256

            try:
                t.sha256 = file_sha256(t.path)
            except OSError:
                return False
        return any(t.path == r.path or (t.sha256 is not None and t.sha256 == r.sha256) for r in refs)

    def segment_target(self, target_id: str, settings: Settings) -> dict:
        """Find the concept in one target (encoded once, then decoded from its cached embedding).
        A target that is one of the concept's reference images is skipped, as the command line does."""
        from ..locate import similarity_grid, similarity_map
        from ..multi import segment_objects
        from ..pipeline import segment

        t = self.target(target_id)
        concept = self._require_concept()
        start = time.perf_counter()
        if self._is_reference(t):
            from ..run import REFERENCE_IMAGE

            t.result, t.overlay, t.drawing = {"status": "skipped", "reason": REFERENCE_IMAGE}, b"", None
            return t.info()
        try:
            image = self._load_target(t)
        except InputError as exc:  # a folder target that cannot be read: its card says so
            t.result, t.overlay, t.drawing = {"status": "error", "error": str(exc)}, b"", None
            return t.info()
        encoded = self.predictor.select(t.key, lambda: image)
        encoded_at = time.perf_counter()
        if settings.multi:
            segs = segment_objects(self.predictor, concept, None, max_objects=settings.max_objects,
                                   min_similarity=settings.min_similarity)
        else:
            segs = [segment(self.predictor, concept, None, settings.min_similarity)]
        found = [s for s in segs if s.found]
        if segs:
            peak = max(s.peak_similarity for s in segs)
        else:  # several objects, none above the threshold: the peak still helps to choose one
            peak = float(similarity_map(similarity_grid(self.predictor.features, concept.target_vector),
                                        self.predictor.upscale).max())
        done = time.perf_counter()

        points = [np.asarray(s.points, np.float32).reshape(-1, 2) for s in segs]
        labels = [np.asarray(s.labels).reshape(-1) for s in segs]
        boxes = [np.asarray(s.box, np.float32).reshape(4) for s in found if s.box is not None]
        t.drawing = Drawing([_png(np.asarray(s.mask, bool).astype(np.uint8) * 255) for s in found],
                            np.concatenate(points) if points else np.zeros((0, 2), np.float32),
                            np.concatenate(labels) if labels else np.zeros(0, np.int64),
                            np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))
        small, scale = _shrink(image, GALLERY_SIDE)
        t.overlay = _jpeg(t.drawing.picture(small, scale))
        t.version += 1
        first = found[0] if found else (segs[0] if segs else None)
        if first is not None and not len(first.points):  # below the threshold: no mask was predicted
            first = None
        if found:
            reason = None
        elif settings.min_similarity is not None and peak < settings.min_similarity:
            reason = f"peak similarity below {settings.min_similarity:.2f}"
        else:
            reason = "SAM's mask at the peak is empty"
        t.result = {
            "status": "ok",
            "found": bool(found),
            "objects": len(found),
            "reason": reason,
            "iou_score": _rounded(first.iou_score if first is not None else None),
            "peak_similarity": _rounded(peak),
            "objects_detail": [{"iou_score": _rounded(s.iou_score), "peak_similarity": _rounded(s.peak_similarity),
                                "area": int(np.count_nonzero(s.mask))} for s in found],
            "method": concept.method,
            "settings": {"multi": settings.multi, "max_objects": settings.max_objects,
                         "min_similarity": settings.min_similarity},
            "encoded": encoded,
            "encode_s": round(encoded_at - start, 3),
            "segment_s": round(done - encoded_at, 3),
            "overlay": f"/api/targets/{t.id}/overlay.jpg?v={t.version}",
            "full": f"/api/targets/{t.id}/full.jpg?v={t.version}",
        }
        return t.info()

    def full_overlay(self, target_id: str) -> bytes:
        """The overlay of the target's last result at the image's full size (JPEG), as the zip's."""
        t = self.target(target_id)
        if t.drawing is None:
            raise NotFound(f"no result for {t.name} yet: run first")
        return _jpeg(t.drawing.picture(self._load_target(t)), 90)

    def similarity_png(self, target_id: str) -> bytes:
        """The target-similarity heat map of a target (as --save-similarity), gallery size."""
        from .. import visualize
        from ..locate import similarity_grid, similarity_map

        t = self.target(target_id)
        concept = self._require_concept()
        if t.key is None:  # a folder target not segmented yet: read it for its key
            self._load_target(t)
        self.predictor.select(t.key, lambda: self._load_target(t))
        similarity = similarity_map(similarity_grid(self.predictor.features, concept.target_vector), self.predictor.upscale)
        picture = visualize.heatmap(similarity)
        small, _ = _shrink(picture, GALLERY_SIDE)
        return _png(small)

    # the zip

    def results_zip(self, settings: Settings) -> bytes:
        """The masks, overlays and results.json of every target, written by persam.run's OutputFolder
        (what `persam apply reference.concept TARGETS --out DIR` writes), plus the concept file and
        the reference masks, as one zip."""
        from ..io import atomic_save_png
        from ..run import RESULTS_FILE, OutputFolder, RunOptions, file_sha256

        concept = self._require_concept()
        if not self.targets:
            raise InputError("no target images: add some and run first")
        work = self.dir / f"zip-{self._new_id()}"
        out = work / "results"
        try:
            name, data = self.concept_bytes()
            work.mkdir(parents=True)
            concept_file = work / CONCEPT_IN_ZIP
            concept_file.write_bytes(data)
            refs = self._concept_references()
            ref_masks = [f"reference_mask_{k}.png" if len(refs) > 1 else "reference_mask.png"
                         for k, _ in enumerate(refs, start=1)]
            info = {"model_type": self.app.config.model_type,
                    "checkpoint": self.app.config.checkpoint.name if self.app.config.checkpoint else None,
                    "concept": CONCEPT_IN_ZIP, "made_by": "persam app",
                    "reference": {"images": [r.name for r in refs], "masks": ref_masks or None,
                                  "mask_sources": [r.mask_source for r in refs] or None,
                                  "points": [[list(p) for p in r.points] for r in refs] or None,
                                  "boxes": [list(r.box) if r.box else None for r in refs] or None,
                                  "concept_file": self.concept_source if self.concept_source != "references" else None}}
            made_with = {"method": concept.method, "concept_sha256": file_sha256(concept_file),
                         "model_type": self.app.config.model_type, "checkpoint_sha256": self.app.checkpoint_sha256(),
                         "precision": self.app.config.precision}
            options = RunOptions(multi=settings.multi, max_objects=settings.max_objects,
                                 min_similarity=settings.min_similarity, progress=False, info=info,
                                 made_with=made_with, extra_outputs=(CONCEPT_IN_ZIP, *ref_masks),
                                 reference_images=tuple(r.path for r in refs))
            targets = list(self.targets.values())
            with OutputFolder(out, options, log=lambda line: None) as folder:
                planned = folder.plan([t.path for t in targets])
                folder.run(self.predictor, concept, planned)
            shutil.copyfile(concept_file, out / CONCEPT_IN_ZIP)
            for r, mask_name in zip(refs, ref_masks):
                atomic_save_png(out / mask_name, r.mask)
            results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
            shown = {str(t.path): t.name for t in targets if t.uploaded}  # no server paths for uploads
            for record in results.get("images", []):
                if record.get("image") in shown:
                    record["image"] = shown[record["image"]]
            (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.write(out / RESULTS_FILE, RESULTS_FILE)
                for file in sorted(results.get("files", [])):
                    if file != RESULTS_FILE and (out / file).is_file():
                        archive.write(out / file, file)
            return buffer.getvalue()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # everything, for the page (after a reload)

    def state(self) -> dict:
        return {
            "references": [r.info() for r in self.references.values()],
            "targets": [t.info() for t in self.targets.values()],
            "concept": self.concept_info(),
        }


# --------------------------------------------------------------------------------------------
# the app


class AppState:
    """The model, the embedding cache and the sessions (at most max_sessions; a new one replaces the
    least recently used session that is not working, else it is refused)."""

    def __init__(self, predictor: SamPredictor, config: AppConfig) -> None:
        self.config = config
        self.model = SharedModel(predictor)
        self.embeddings = EmbeddingCache(config.max_embeddings)
        self._own_work_dir = config.work_dir is None
        self.work_dir = Path(config.work_dir) if config.work_dir else Path(tempfile.mkdtemp(prefix="persam-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        self._lock = threading.Lock()
        self._sha256: Optional[str] = None

    def checkpoint_sha256(self) -> Optional[str]:
        if self._sha256 is None and self.config.checkpoint is not None and Path(self.config.checkpoint).is_file():
            from ..run import file_sha256

            self._sha256 = file_sha256(self.config.checkpoint)
        return self._sha256

    def find(self, session_id: Optional[str]) -> Optional[Session]:
        """The session of that id (now the most recently used), or None (never was, or evicted)."""
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is not None:
                self._sessions.move_to_end(session.id)
            return session

    def new_session(self) -> Session:
        """A new session (a person starts working).  At max_sessions it replaces the least recently
        used session that is not working (see Session.working), whose files are deleted; AppFull
        when every session is working."""
        with self._lock:
            while len(self._sessions) >= self.config.max_sessions:
                if not self._evict_one():
                    idle = self.config.session_idle_s
                    raise AppFull(f"the app already serves {len(self._sessions)} sessions, the most it keeps, and each "
                                  f"was used in the last {idle / 60:g} minutes; try again later")
            session = Session(self, secrets.token_urlsafe(24))
            self._sessions[session.id] = session
            return session

    def _evict_one(self) -> bool:
        """Close the least recently used session that is not working (under its lock); False if none."""
        now = time.monotonic()
        for old in list(self._sessions.values()):
            if old.working(self.config.session_idle_s, now) or not old.lock.acquire(blocking=False):
                continue
            try:
                self._drop(old)
            finally:
                old.lock.release()
            return True
        return False

    def _drop(self, session: Session) -> None:
        del self._sessions[session.id]
        self.embeddings.drop_session(session.id)
        session.close()

    def discard(self, session: Session) -> None:
        """Forget a session nobody was told of (its first request failed and left nothing in it)."""
        with self._lock:
            if self._sessions.get(session.id) is session and session.lock.acquire(blocking=False):
                try:
                    self._drop(session)
                finally:
                    session.lock.release()

    def session_ids(self) -> List[str]:
        with self._lock:
            return list(self._sessions)

    def status(self) -> dict:
        return {"model_type": self.config.model_type, "device": str(self.model.predictor.device),
                "sessions": len(self._sessions), "max_sessions": self.config.max_sessions,
                "cached_embeddings": len(self.embeddings),
                "max_embeddings": self.config.max_embeddings, "encodes": self.model.encodes,
                "allow_folders": self.config.allow_folders, "max_megapixels": self.config.max_megapixels,
                "max_upload_mb": self.config.max_upload_mb}

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
