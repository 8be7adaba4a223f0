"""What a session finds in its targets: a target segmented (its result, overlay and drawing), the
full-size overlay, the similarity heat map, and the zip of every result.

Each function takes the :class:`~persam.app.session.Session` whose target it works on (the
session's methods of the same names call them, under the session's lock).  Step 2's heat map is
:func:`persam.method.pipeline.locate`; the zip is written by :class:`persam.runs.folder.OutputFolder`.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from persam.app import gfsam
from persam.app.images import jpeg, png, shrink
from persam.app.items import Drawing
from persam.app.settings import CONCEPT_IN_ZIP, GALLERY_SIDE, NotFound, Settings
from persam.errors import InputError


def _rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def segment_target(session, target_id: str, settings: Settings) -> dict:
    """Find the concept in one target (encoded once, then decoded from its cached embedding).
    A target that is one of the concept's reference images is skipped, as the command line does."""
    t = session.target(target_id)
    concept = session.require_concept()
    start = time.perf_counter()
    if session.is_reference(t):
        from persam.runs.records import REFERENCE_IMAGE

        t.result, t.overlay, t.drawing = {"status": "skipped", "reason": REFERENCE_IMAGE}, b"", None
        return t.info()
    try:
        image = session.load_target(t)
    except InputError as exc:  # a folder target that cannot be read: its card says so
        t.result, t.overlay, t.drawing = {"status": "error", "error": str(exc)}, b"", None
        return t.info()
    if concept.method == gfsam.METHOD:  # it encodes the photo itself (SAM and DINOv2 on its frame)
        encoded, encoded_at = False, time.perf_counter()
        segs, peak = gfsam.find(session, concept, image, settings)
    else:
        encoded = session.predictor.select(t.key, lambda: image)
        encoded_at = time.perf_counter()
        segs, peak = _find(session.predictor, concept, settings)
    found = [s for s in segs if s.found]
    done = time.perf_counter()

    t.drawing = _drawing(segs, found)
    small, scale = shrink(image, GALLERY_SIDE)
    t.overlay = jpeg(t.drawing.picture(small, scale))
    t.version += 1
    first = found[0] if found else (segs[0] if segs else None)
    if first is not None and not len(first.points):  # below the threshold: no mask was predicted
        first = None
    t.result = {
        "status": "ok",
        "found": bool(found),
        "objects": len(found),
        "reason": _reason(found, peak, settings),
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


def _find(predictor, concept, settings: Settings) -> Tuple[List, float]:
    """Steps 2 and 3 on the predictor's current image, as the settings ask: the segmentations and
    the peak similarity (from step 2's map alone when no object is above the threshold)."""
    from persam.method.multi import segment_objects
    from persam.method.pipeline import locate, segment

    if settings.multi:
        segs = segment_objects(predictor, concept, None, max_objects=settings.max_objects,
                               min_similarity=settings.min_similarity)
    else:
        segs = [segment(predictor, concept, None, settings.min_similarity)]
    if segs:
        peak = max(s.peak_similarity for s in segs)
    else:  # several objects, none above the threshold: the peak still helps to choose one
        peak = float(locate(predictor, concept, predictor.current_image()).max())
    return segs, peak


def _drawing(segs: List, found: List) -> Drawing:
    """What the overlays of a target's segmentations show: the masks found, every prompt point, the boxes."""
    points = [np.asarray(s.points, np.float32).reshape(-1, 2) for s in segs]
    labels = [np.asarray(s.labels).reshape(-1) for s in segs]
    boxes = [np.asarray(s.box, np.float32).reshape(4) for s in found if s.box is not None]
    return Drawing([png(np.asarray(s.mask, bool).astype(np.uint8) * 255) for s in found],
                   np.concatenate(points) if points else np.zeros((0, 2), np.float32),
                   np.concatenate(labels) if labels else np.zeros(0, np.int64),
                   np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))


def _reason(found: List, peak: float, settings: Settings) -> Optional[str]:
    """Why nothing was found (None when something was)."""
    if found:
        return None
    if settings.min_similarity is not None and peak < settings.min_similarity:
        return f"peak similarity below {settings.min_similarity:.2f}"
    return "SAM's mask at the peak is empty"


def full_overlay(session, target_id: str) -> bytes:
    """The overlay of the target's last result at the image's full size (JPEG), as the zip's."""
    t = session.target(target_id)
    if t.drawing is None:
        raise NotFound(f"no result for {t.name} yet: run first")
    return jpeg(t.drawing.picture(session.load_target(t)), 90)


def similarity_png(session, target_id: str) -> bytes:
    """The target-similarity heat map of a target (as --save-similarity), gallery size."""
    from persam.data import visualize
    from persam.method.pipeline import locate

    t = session.target(target_id)
    concept = session.require_concept()
    if concept.method == gfsam.METHOD:
        raise InputError("GF-SAM draws no similarity heat map (the map is PerSAM's, over SAM's features)")
    if t.key is None:  # a folder target not segmented yet: read it for its key
        session.load_target(t)
    session.predictor.select(t.key, lambda: session.load_target(t))
    similarity = locate(session.predictor, concept, session.predictor.current_image())
    picture = visualize.heatmap(similarity)
    small, _ = shrink(picture, GALLERY_SIDE)
    return png(small)


def results_zip(session, settings: Settings) -> bytes:
    """The masks, overlays and results.json of every target, written by persam.runs.folder's OutputFolder
    (what `persam apply reference.concept TARGETS --out DIR` writes), plus the concept file and
    the reference masks, as one zip."""
    from persam.runs.folder import OutputFolder
    from persam.runs.local import run_folder

    concept = session.require_concept()
    if not session.targets:
        raise InputError("no target images: add some and run first")
    work = session.dir / f"zip-{session.new_id()}"
    out = work / "results"
    try:
        work.mkdir(parents=True)
        concept_file = work / CONCEPT_IN_ZIP
        concept_file.write_bytes(session.concept_bytes()[1])
        refs = session.concept_references()
        ref_masks = [f"reference_mask_{k}.png" if len(refs) > 1 else "reference_mask.png"
                     for k, _ in enumerate(refs, start=1)]
        options = _zip_run_options(session, settings, concept, concept_file, refs, ref_masks)
        targets = list(session.targets.values())
        with OutputFolder(out, options, log=lambda line: None) as folder:
            planned = folder.plan([t.path for t in targets])
            if concept.method == gfsam.METHOD:  # on the app's predictor itself, under the shared lock
                with session.app.model.lock:
                    run_folder(folder, session.app.model.predictor, gfsam.zip_task(session, concept), planned)
            else:
                run_folder(folder, session.predictor, concept, planned)
        _add_references(out, concept_file, refs, ref_masks)
        results = _hide_server_paths(out, targets)
        return _zipped(out, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _zip_run_options(session, settings: Settings, concept, concept_file: Path, refs, ref_masks: List[str]):
    """The run's options: the page's settings, what made the masks, and the files beside them."""
    from persam.runs.key import file_sha256
    from persam.runs.records import RunOptions

    config = session.app.config
    info = {"model_type": config.model_type, "checkpoint": config.checkpoint.name if config.checkpoint else None,
            "concept": CONCEPT_IN_ZIP, "made_by": "persam app",
            "reference": {"images": [r.name for r in refs], "masks": ref_masks or None,
                          "mask_sources": [r.mask_source for r in refs] or None,
                          "points": [[list(p) for p in r.points] for r in refs] or None,
                          "boxes": [list(r.box) if r.box else None for r in refs] or None,
                          "concept_file": session.concept_source if session.concept_source != "references" else None}}
    made_with = {"method": concept.method, "concept_sha256": file_sha256(concept_file),
                 "model_type": config.model_type, "checkpoint_sha256": session.app.checkpoint_sha256(),
                 "precision": config.precision}
    return RunOptions(multi=settings.multi, max_objects=settings.max_objects, min_similarity=settings.min_similarity,
                      progress=False, info=info, made_with=made_with, extra_outputs=(CONCEPT_IN_ZIP, *ref_masks),
                      reference_images=tuple(r.path for r in refs))


def _add_references(out: Path, concept_file: Path, refs, ref_masks: List[str]) -> None:
    from persam.data.io import atomic_save_png

    shutil.copyfile(concept_file, out / CONCEPT_IN_ZIP)
    for r, mask_name in zip(refs, ref_masks):
        atomic_save_png(out / mask_name, r.mask)


def _hide_server_paths(out: Path, targets) -> dict:
    """results.json with uploaded images named by their names, not by where the server keeps them."""
    from persam.runs.records import RESULTS_FILE

    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    shown = {str(t.path): t.name for t in targets if t.uploaded}
    for record in results.get("images", []):
        if record.get("image") in shown:
            record["image"] = shown[record["image"]]
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return results


def _zipped(out: Path, results: dict) -> bytes:
    """results.json and every file it lists, as one zip."""
    from persam.runs.records import RESULTS_FILE

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(out / RESULTS_FILE, RESULTS_FILE)
        for file in sorted(results.get("files", [])):
            if file != RESULTS_FILE and (out / file).is_file():
                archive.write(out / file, file)
    return buffer.getvalue()
