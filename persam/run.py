"""Batch runner: find a learned concept in many target images and write the results.

For every target image (files, folders of images, glob patterns; see :func:`expand_targets`)
the image is encoded once and segmented (one object, or several with ``multi``); into the
output folder go, each written atomically:

    <name>.png              the mask, 0/255 (with ``multi``: a palette label PNG, object k = k)
    <name>_overlay.jpg      the image with the mask(s), prompt points and box(es)
    <name>_similarity.png   the target-similarity heat map (with ``save_similarity``)
    results.json            one record per image, rewritten after every image

An image whose outputs all exist already is skipped (resume) unless ``overwrite``.  An image
that cannot be loaded is reported and recorded as an error; the run goes on.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .io import InputError, atomic_save_png, atomic_write_bytes, atomic_write_text, load_image
from .pipeline import Concept, Segmentation, segment

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESULTS_FILE",
    "RunOptions",
    "Target",
    "expand_targets",
    "plan_targets",
    "run_batch",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESULTS_FILE = "results.json"
RESULTS_VERSION = 1
MAX_LABELS = 255  # objects one 8-bit label PNG can hold (0 is background)
_GLOB_CHARS = set("*?[")


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

    def __post_init__(self) -> None:
        if not 1 <= self.max_objects <= MAX_LABELS:
            raise ValueError(f"max_objects must be between 1 and {MAX_LABELS} (the label PNG holds {MAX_LABELS} "
                             f"objects), got {self.max_objects}")
        if self.overlay_format not in ("jpg", "png"):
            raise ValueError(f"overlay_format must be 'jpg' or 'png', got {self.overlay_format!r}")


@dataclass
class Target:
    path: Path
    name: str  # output file stem, unique within the run
    done: bool = False  # all outputs exist already


# --------------------------------------------------------------------------------------------
# targets


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def expand_targets(specs: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """Image paths named by `specs` (files, folders: their images sorted, glob patterns: the
    matching images sorted), without duplicates, and warnings for specs that name nothing.

    A file that does not exist is kept (it is reported as an error when it is loaded)."""
    paths: List[Path] = []
    warnings: List[str] = []
    seen = set()

    def add(p: Path) -> None:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and _is_image(q))
            if not found:
                warnings.append(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            for q in found:
                add(q)
        elif p.exists() or not (_GLOB_CHARS & set(spec)):
            add(p)
        else:
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True))
            found = [q for q in found if q.is_file() and _is_image(q)]
            if not found:
                warnings.append(f"pattern {spec} matches no images")
            for q in found:
                add(q)
    return paths, warnings


def _unique_names(paths: Sequence[Path]) -> List[str]:
    """Output stems: the file stem, or parent_stem (then a counter) where stems collide."""
    stems = [p.stem for p in paths]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names, used = [], set()
    for p, s in zip(paths, stems):
        name = s if counts[s] == 1 else f"{p.parent.name}_{s}" if p.parent.name else s
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def output_files(name: str, options: RunOptions) -> Dict[str, str]:
    files = {"mask": f"{name}.png", "overlay": f"{name}_overlay.{options.overlay_format}"}
    if options.save_similarity:
        files["similarity"] = f"{name}_similarity.png"
    return files


def plan_targets(paths: Sequence[Path], out_dir: Path, options: RunOptions) -> List[Target]:
    """Targets with their output names, marked done when all their outputs exist (and not overwrite)."""
    targets = []
    for path, name in zip(paths, _unique_names(paths)):
        done = not options.overwrite and all(
            (out_dir / f).is_file() for f in output_files(name, options).values()
        )
        targets.append(Target(Path(path), name, done))
    return targets


# --------------------------------------------------------------------------------------------
# results


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


def _read_previous(path: Path) -> Dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {r["name"]: r for r in data.get("images", []) if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


# --------------------------------------------------------------------------------------------
# the run


def _encode_jpg_or_png(rgb: np.ndarray, fmt: str) -> bytes:
    import cv2

    ext = ".png" if fmt == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise InputError(f"cannot encode the overlay as {fmt}")
    return buf.tobytes()


def _segment_image(predictor, concept: Concept, options: RunOptions, keep_similarity: bool) -> List[Segmentation]:
    if not options.multi:
        return [segment(predictor, concept, None, options.min_similarity, keep_similarity)]
    from .multi import segment_objects

    return list(
        segment_objects(predictor, concept, None, max_objects=options.max_objects,
                        min_similarity=options.min_similarity)
    )


def _similarity(predictor, concept: Concept, segs: List[Segmentation]):
    for s in segs:
        if s.similarity is not None:
            return s.similarity
    from .locate import similarity_grid, similarity_map

    return similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)


def _write_outputs(predictor, concept, options, image, segs, found, out_dir, files, written) -> None:
    """The similarity heat map, overlay and mask of one image (mask last: it marks the image done)."""
    from . import visualize

    if options.save_similarity:
        sim = _similarity(predictor, concept, segs)
        written.append(atomic_save_png(out_dir / files["similarity"], visualize.heatmap(sim)))
    points, labels = _all_points(segs)
    boxes = [s.box for s in found if s.box is not None]
    picture = visualize.overlay(image, [s.mask for s in found], points, labels, boxes or None)
    written.append(atomic_write_bytes(out_dir / files["overlay"], _encode_jpg_or_png(picture, options.overlay_format)))
    if options.multi:
        label_map = np.zeros(image.shape[:2], dtype=np.uint8)
        for k, s in enumerate(found, start=1):
            label_map[np.asarray(s.mask, dtype=bool) & (label_map == 0)] = k
        written.append(atomic_save_png(out_dir / files["mask"], label_map, palette="davis"))
    else:
        mask = found[0].mask if found else np.zeros(image.shape[:2], dtype=bool)
        written.append(atomic_save_png(out_dir / files["mask"], np.asarray(mask, dtype=bool)))


def _all_points(segs: List[Segmentation]):
    if not segs:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    points = np.concatenate([np.asarray(s.points, dtype=np.float32).reshape(-1, 2) for s in segs])
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64).reshape(-1) for s in segs])
    return points, labels


def run_batch(
    predictor,
    concept: Concept,
    targets: Sequence[Target],
    out_dir,
    options: Optional[RunOptions] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Segment every target not done yet; write its outputs and results.json (after each image).

    Returns the results dictionary (as written).  `log` receives one line per problem
    (default: stderr, through tqdm so that the progress bar stays intact)."""
    options = options or RunOptions()
    out_dir = Path(out_dir)
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    results_path = out_dir / RESULTS_FILE
    previous = _read_previous(results_path)
    records: Dict[str, dict] = {}
    current = [t.name for t in targets]

    def write_results() -> dict:
        ordered = [records[n] for n in current if n in records]
        ordered += [r for n, r in previous.items() if n not in records and n not in current]
        summary = {
            "images": len(ordered),
            "segmented": sum(r.get("status") == "ok" for r in ordered),
            "skipped": sum(r.get("status") == "skipped" for r in ordered),
            "errors": sum(r.get("status") == "error" for r in ordered),
            "found": sum(bool(r.get("found")) for r in ordered),
        }
        data = {"version": RESULTS_VERSION, "method": concept.method, **options.info,
                "multi": options.multi, "summary": summary, "images": ordered}
        atomic_write_text(results_path, json.dumps(data, indent=2) + "\n")
        return data

    for t in targets:
        if t.done:
            old = dict(previous.get(t.name, {"name": t.name, "image": str(t.path)}))
            old["status"] = "skipped"
            records[t.name] = old

    data = write_results()
    pending = [t for t in targets if not t.done]
    bar = tqdm(pending, desc="segmenting", unit="image", file=sys.stderr,
               disable=(not options.progress) if options.progress is not None else None)
    for t in bar:
        record = {"name": t.name, "image": str(t.path)}
        try:
            image = load_image(t.path)
        except InputError as exc:
            log(f"persam: warning: {exc} (skipped)")
            record.update(status="error", error=str(exc))
            records[t.name] = record
            data = write_results()
            continue
        if not image.flags.writeable:  # torch warns on read-only arrays
            image = image.copy()
        start = time.perf_counter()
        predictor.set_image(image)
        encoded = time.perf_counter()
        segs = _segment_image(predictor, concept, options, options.save_similarity)
        done = time.perf_counter()

        found = [s for s in segs if s.found]
        files = output_files(t.name, options)
        written: List[Path] = []
        try:
            _write_outputs(predictor, concept, options, image, segs, found, out_dir, files, written)
        except BaseException:  # interrupted or failed: leave no outputs of this image behind
            for path in written:
                path.unlink(missing_ok=True)
            raise

        first = segs[0] if segs else None
        points, labels = _all_points(segs)
        boxes = [s.box for s in found if s.box is not None]
        record.update(
            status="ok",
            size=[int(image.shape[1]), int(image.shape[0])],
            found=bool(found),
            iou_score=round(float(found[0].iou_score if found else (first.iou_score if first else 0.0)), 5),
            peak_similarity=round(float(max((s.peak_similarity for s in segs), default=0.0)), 5),
            points=_points(points),
            labels=[int(v) for v in labels],
            boxes=[_floats(b) for b in boxes],
            timings={"encode_s": round(encoded - start, 4), "segment_s": round(done - encoded, 4)},
            outputs=files,
        )
        if options.multi:
            record["objects"] = [_object_record(s) for s in found]
        records[t.name] = record
        data = write_results()
    bar.close()
    return data
