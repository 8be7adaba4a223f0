"""One browser session: its references, targets and concept, its uploads in a folder of its own.

A :class:`Session` stores and checks the uploads (bounded in bytes, images checked against the
megapixel limit from their headers), turns clicks or a box into a reference mask
(:func:`persam.method.target.reference_mask_from_prompts`), learns the concept
(:func:`persam.method.pipeline.learn_concept`) or loads one (:mod:`persam.data.concept`), and keeps
the targets; what it finds in them is :mod:`persam.app.results`.  Its requests take turns under its
lock (:meth:`Session.run`).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from persam.app import gfsam, results
from persam.app.cache import SessionPredictor, pixels_key
from persam.app.images import check_pixels, jpeg, mask_data_url, safe_name, shrink
from persam.app.items import Reference, Target
from persam.app.settings import (FOLDER_LIMITS, MAX_CLICKS, MAX_REFERENCES, MAX_TARGETS, PREVIEW_SIDE, THUMB_SIDE,
                                 NotFound, SessionClosed, Settings)
from persam.data.io import check_reference_mask, load_image, load_mask
from persam.errors import InputError


class Session:
    """One browser's references, targets, concept and results; its files in its own folder."""

    def __init__(self, app, session_id: str) -> None:  # app: the AppState
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

    def new_id(self) -> str:
        return secrets.token_hex(8)

    def _store(self, kind: str, filename: Optional[str], stream) -> Tuple[Path, str, str]:
        """Copy an upload into the session folder (at most max_upload_mb, and the session's files
        together at most max_session_mb); its path, safe name and sha256."""
        config = self.app.config
        name = safe_name(filename)
        room = int(config.max_session_mb * 2**20) - self.disk_bytes()
        limit = min(int(config.max_upload_mb * 2**20), room)
        session_full = InputError(
            f"{name}: this session already keeps {(int(config.max_session_mb * 2**20) - room) / 2**20:.0f} MB of "
            f"uploads, and the app keeps at most {config.max_session_mb:g} MB per session; remove some images first "
            f"(or use `persam segment` for large batches)")
        if room <= 0:
            raise session_full
        (self.dir / kind).mkdir(exist_ok=True)  # not parents: an evicted session's folder is not made again
        folder = self.dir / kind / self.new_id()
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

    def read_image(self, path: Path, name: str) -> np.ndarray:
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
            return path, name, sha256, self.read_image(path, name)
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
        preview, _ = shrink(image, PREVIEW_SIDE)
        ref = Reference(self.new_id(), name, path, width, height, pixels_key(image), sha256=sha256,
                        preview=jpeg(preview, 90), preview_size=(preview.shape[1], preview.shape[0]))
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
        return lambda: self.read_image(ref.path, ref.name)

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
            from persam.method.target import reference_mask_from_prompts

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
        ref.mask_png = mask_data_url(mask, ref.preview_size) if mask is not None else ""
        ref.version += 1

    # the concept

    def learn(self, method: str = "persam", steps: int = 1000) -> dict:
        """Learn the concept from every reference that has a mask (kept while nothing changed)."""
        from persam.method.finetune import FinetuneSettings
        from persam.method.pipeline import METHODS, learn_concept

        if method not in (*METHODS, gfsam.METHOD):
            raise InputError(f"method must be one of {', '.join((*METHODS, gfsam.METHOD))}, not {method!r}")
        if method == gfsam.METHOD:
            self.app.dinov2.require()  # the reason the page shows beside the disabled choice
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
            pairs = [(self.read_image(r.path, r.name), r.mask) for r in refs]
            if method == gfsam.METHOD:  # DINOv2 features: SAM's embeddings are not needed
                self.concept = gfsam.learn(self, pairs)
            else:
                encoded = [tuple(self.predictor.embedding(r.key, self._load_reference(r)))[:2] for r in refs]
                settings = FinetuneSettings(steps=steps) if method == "persam_f" else None
                self.concept = learn_concept(self.predictor, pairs, method=method, finetune=settings,
                                             encoded=encoded)
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

    def require_concept(self):
        if self.concept is None:
            raise InputError("nothing learned yet: mark the object in a reference image and run (or load a concept file)")
        return self.concept

    def concept_bytes(self) -> Tuple[str, bytes]:
        """The concept file (as `persam learn` writes it): file name and bytes."""
        from persam.data.concept import save_concept

        concept = self.require_concept()
        path = self.dir / "concept-out" / f"{self.new_id()}.concept"
        save_concept(concept, path, model_type=self.app.config.model_type, checkpoint_sha256=self.app.checkpoint_sha256())
        try:
            return f"{self.concept_name}.concept", path.read_bytes()
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    def load_concept(self, filename: Optional[str], stream) -> dict:
        """A concept file from `persam learn` or this page; refused when learned with another model."""
        from persam.data.concept import load_concept

        path, name, _ = self._store("concepts", filename, stream)
        try:
            concept = load_concept(path, model_type=self.app.config.model_type,
                                   checkpoint_sha256=self.app.checkpoint_sha256())
        except InputError as exc:
            raise InputError(str(exc).replace(str(path), name)) from None
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        if concept.method == gfsam.METHOD:
            gfsam.check_loaded(self, concept, name)
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
        thumb, _ = shrink(image, THUMB_SIDE)
        t = Target(self.new_id(), name, path, image.shape[1], image.shape[0], pixels_key(image), sha256=sha256,
                   thumb=jpeg(thumb, 80))
        self.targets[t.id] = t
        return t.info()

    def add_folder(self, folder: str) -> Tuple[List[dict], List[str]]:
        """Every image in a folder (or glob pattern) on the server, read where it is when segmented;
        and the expansion's notes.  Expanded as the command line expands a SOURCE
        (:func:`persam.data.sources.expand_targets`: no folder listed twice, only regular files, bounded
        by FOLDER_LIMITS with a message naming the pattern)."""
        from persam.data.sources import expand_targets
        from persam.data.uri_sources import is_uri

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
            t = Target(self.new_id(), str(p), p, uploaded=False)
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

    def load_target(self, t: Target) -> np.ndarray:
        image = self.read_image(t.path, t.name)
        if t.key is None or t.width is None:
            t.key, t.width, t.height = pixels_key(image), image.shape[1], image.shape[0]
        return image

    def concept_references(self) -> List[Reference]:
        """The references the concept was learned from (none for a loaded concept file)."""
        if self.concept_source != "references":
            return []
        return [r for r in self.references.values() if r.mask is not None]

    def is_reference(self, t: Target) -> bool:
        """True when the target is one of the concept's reference images: the same file or the same
        content (sha256), as the command line skips it (persam.runs.records' RunOptions.reference_images)."""
        refs = self.concept_references()
        if not refs:
            return False
        if t.sha256 is None and not t.uploaded:
            from persam.runs.key import file_sha256

            try:
                t.sha256 = file_sha256(t.path)
            except OSError:
                return False
        return any(t.path == r.path or (t.sha256 is not None and t.sha256 == r.sha256) for r in refs)

    # results (persam.app.results)

    def segment_target(self, target_id: str, settings: Settings) -> dict:
        """Find the concept in one target: :func:`persam.app.results.segment_target`."""
        return results.segment_target(self, target_id, settings)

    def full_overlay(self, target_id: str) -> bytes:
        """The target's last result at full size (JPEG): :func:`persam.app.results.full_overlay`."""
        return results.full_overlay(self, target_id)

    def similarity_png(self, target_id: str) -> bytes:
        """The target's heat map (PNG): :func:`persam.app.results.similarity_png`."""
        return results.similarity_png(self, target_id)

    def results_zip(self, settings: Settings) -> bytes:
        """Every target's result as one zip: :func:`persam.app.results.results_zip`."""
        return results.results_zip(self, settings)

    # everything, for the page (after a reload)

    def state(self) -> dict:
        return {
            "references": [r.info() for r in self.references.values()],
            "targets": [t.info() for t in self.targets.values()],
            "concept": self.concept_info(),
        }
