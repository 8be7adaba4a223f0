"""PerSeg evaluation: segment every test image of every class, then score (mIoU, bIoU).

    OUT/pred/<class>/<name>.png   the predictions, in PerSeg layout (palette PNG, index 1 = object)
    OUT/scores.csv, scores.json   per-class IoU / bIoU, mIoU / mBIoU, timings
    OUT/scores.png                bar chart
    OUT/eval.json                 the files persam wrote here, the settings of the predictions

The output folder keeps persam's promises (eval.outputs): predictions made earlier with the
same settings are kept (resume), predictions made with other settings are refused unless
``overwrite``, no file persam did not write is replaced. With ``pred`` nothing is run: the
predictions there (``<class>/<name>.png``) are scored. Predictions and ground truth are paired
by name; the reference image (00) is never scored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np
from tqdm import tqdm

from persam.errors import InputError
from persam.data.io import atomic_save_png, load_image, load_mask
from persam.runs.defaults import DEFAULT_MODEL, DEFAULT_PRECISION

from eval.datasets import PerSegDataset
from eval.metrics import boundary_iou, class_scores, iou, miou
from eval.outputs import PRED_FOLDER, SCORE_FILES, EvalFolder
from eval.report import (PredictionModel, bar_chart, check_prediction_size, format_table,
                     prediction_settings, predictions_to_score, timing_summary, write_csv, write_json)

__all__ = ["run_perseg", "predict_perseg", "score_perseg"]


def _select_classes(dataset: PerSegDataset, classes: Optional[Sequence[str]]) -> List[str]:
    if classes is None:
        return dataset.classes()
    unknown = [c for c in classes if c not in dataset.classes()]
    if unknown:
        raise InputError(f"unknown PerSeg class(es): {', '.join(unknown)} (available: {', '.join(dataset.classes())})")
    return list(classes)


def predict_perseg(predictor, dataset: PerSegDataset, classes: Sequence[str], pred_dir: Path, method: str,
                   progress: bool = True, done: Optional[Callable[[Path], bool]] = None) -> Dict[str, object]:
    """Write the predictions not `done` (default: those whose file exists); returns timings (seconds)."""
    from persam.method.pipeline import learn_concept, segment

    done = done or Path.is_file
    learn_times, image_times, skipped = [], [], 0
    todo = [(c, name, image) for c in classes for name, image, _ in dataset.test_pairs(c)]
    bar = tqdm(total=len(todo), desc="PerSeg", unit="image", disable=not progress)
    try:
        for c in classes:
            pairs = [(name, image) for name, image, _ in dataset.test_pairs(c)
                     if not done(pred_dir / c / f"{name}.png")]
            skipped += len(dataset.test_pairs(c)) - len(pairs)
            bar.update(len(dataset.test_pairs(c)) - len(pairs))
            if not pairs:
                continue
            ref_image_path, ref_mask_path = dataset.reference(c)
            ref_image = load_image(ref_image_path)
            ref_mask = load_mask(ref_mask_path, ref_image.shape)
            start = time.perf_counter()
            concept = learn_concept(predictor, [(ref_image, ref_mask)], method=method)
            learn_times.append(time.perf_counter() - start)
            for name, image_path in pairs:
                image = load_image(image_path)
                start = time.perf_counter()
                result = segment(predictor, concept, image)
                image_times.append(time.perf_counter() - start)
                atomic_save_png(pred_dir / c / f"{name}.png", result.mask.astype(np.uint8), palette="davis")
                bar.update(1)
    finally:
        bar.close()
    return {"learn": timing_summary(learn_times), "per_image": timing_summary(image_times), "skipped_images": skipped}


def score_perseg(dataset: PerSegDataset, classes: Sequence[str], pred_dir: Path) -> Dict[str, object]:
    """Per-class IoU / bIoU (sum of intersections over sum of unions), per-image IoU, mIoU, mBIoU."""
    missing = [str(pred_dir / c / f"{name}.png") for c in classes for name, _, _ in dataset.test_pairs(c)
               if not (pred_dir / c / f"{name}.png").is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(f"missing predictions: {', '.join(missing[:5])}{more}")
    per_class, per_image = {}, {}
    for c in classes:
        pairs = []
        for name, _, gt_path in dataset.test_pairs(c):
            gt = load_mask(gt_path)
            pred_path = pred_dir / c / f"{name}.png"
            pred = load_mask(pred_path)
            check_prediction_size(pred, pred_path, gt.shape, gt_path)
            pairs.append((pred, gt))
        per_class[c] = class_scores(pairs)
        per_image[c] = {name: {"iou": iou(p, g), "biou": boundary_iou(p, g)}
                        for (name, _, _), (p, g) in zip(dataset.test_pairs(c), pairs)}
    return {"classes": per_class, "images": per_image,
            "miou": miou(per_class, "iou"), "mbiou": miou(per_class, "biou")}


def run_perseg(
    data: str,
    out: str,
    method: str = "persam",
    model_type: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    pred: Optional[str] = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    predictor=None,
    backend: str = "auto",
    overwrite: bool = False,
) -> Dict[str, object]:
    """The whole PerSeg evaluation (see the module doc); returns what scores.json holds.

    Everything is checked before `out` is touched; InputError (one line) on bad input and on a
    conflict with what `out` holds (predictions made with other settings without `overwrite`, a
    file persam did not write)."""
    stream = sys.stdout if stream is None else stream
    dataset = PerSegDataset(data)
    selected = _select_classes(dataset, classes)
    out_dir = Path(out)
    model, made_with = None, None
    if pred is None:
        model = PredictionModel.resolve(model_type, checkpoint, device, precision, backend, predictor)
        made_with = prediction_settings("perseg", dataset.root, method, model)
    record: Dict[str, object] = {"dataset": "perseg", "data": str(dataset.root), "classes_evaluated": selected}
    with EvalFolder(out_dir, made_with, overwrite) as folder:
        predictions = [f"{PRED_FOLDER}/{c}/{name}.png" for c in selected for name, _, _ in dataset.test_pairs(c)]
        pred_dir, fields = predictions_to_score(
            pred, folder, predictions,
            lambda p, done: predict_perseg(p, dataset, selected, folder.pred_dir, method, progress, done),
            model, method)
        record.update(fields)
        scores = score_perseg(dataset, selected, pred_dir)
        record.update(scores)
        _report(record, scores, out_dir, folder, stream)
    return record


def _report(record: Dict[str, object], scores: Dict[str, object], out_dir: Path, folder: EvalFolder,
            stream: TextIO) -> None:
    """The table on `stream`; scores.csv, scores.json and scores.png in `out_dir`."""
    header = ["class", "images", "IoU", "bIoU", "mean image IoU"]
    rows = [[c, s["n_images"], s["iou"], s["biou"], s["mean_image_iou"]] for c, s in scores["classes"].items()]
    rows.append(["mean", sum(s["n_images"] for s in scores["classes"].values()), scores["miou"], scores["mbiou"],
                 float(np.mean([s["mean_image_iou"] for s in scores["classes"].values()]))])
    print(format_table(header, rows), file=stream)
    timing = record.get("timing")
    if timing and timing["per_image"]["mean_s"] is not None:
        print(f"time per image: {timing['per_image']['mean_s']:.3f} s ({timing['per_image']['count']} images)", file=stream)
    folder.claim(SCORE_FILES)
    write_csv(out_dir / "scores.csv", ["class", "n_images", "iou", "biou", "mean_image_iou"], rows)
    write_json(out_dir / "scores.json", record)
    bar_chart(out_dir / "scores.png", [r[0] for r in rows],
              {"IoU": [r[2] for r in rows], "bIoU": [r[3] for r in rows]},
              f"PerSeg {record.get('method') or 'predictions'}: mIoU {scores['miou']:.3f}, mBIoU {scores['mbiou']:.3f}")
