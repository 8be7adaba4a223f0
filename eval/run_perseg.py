"""PerSeg evaluation: segment every test image of every class, then score (mIoU, bIoU).

    OUT/pred/<class>/<name>.png   the predictions, in PerSeg layout (palette PNG, index 1 = object)
    OUT/scores.csv, scores.json   per-class IoU / bIoU, mIoU / mBIoU, timings
    OUT/scores.png                bar chart

Predictions already in OUT/pred are kept (resume). With ``pred_dir`` nothing is run:
the predictions there (``<class>/<name>.png``) are scored. Predictions and ground truth
are paired by name; the reference image (00) is never scored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO

import numpy as np
from tqdm import tqdm

from persam.io import InputError, atomic_save_png, load_image, load_mask

from .datasets import PerSegDataset
from .metrics import boundary_iou, class_scores, iou, miou
from .report import (bar_chart, check_prediction_size, format_table, predictions_to_score, timing_summary, write_csv,
                     write_json)

__all__ = ["run_perseg", "predict_perseg", "score_perseg"]


def _select_classes(dataset: PerSegDataset, classes: Optional[Sequence[str]]) -> List[str]:
    if classes is None:
        return dataset.classes()
    unknown = [c for c in classes if c not in dataset.classes()]
    if unknown:
        raise InputError(f"unknown PerSeg class(es): {', '.join(unknown)} (available: {', '.join(dataset.classes())})")
    return list(classes)


def predict_perseg(predictor, dataset: PerSegDataset, classes: Sequence[str], pred_dir: Path, method: str,
                   progress: bool = True) -> Dict[str, object]:
    """Write the missing predictions; returns timings (seconds)."""
    from persam.pipeline import learn_concept, segment

    learn_times, image_times, skipped = [], [], 0
    todo = [(c, name, image) for c in classes for name, image, _ in dataset.test_pairs(c)]
    bar = tqdm(total=len(todo), desc="PerSeg", unit="image", disable=not progress)
    try:
        for c in classes:
            pairs = [(name, image) for name, image, _ in dataset.test_pairs(c)
                     if not (pred_dir / c / f"{name}.png").is_file()]
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
    model_type: str = "vit_h",
    checkpoint: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    pred: Optional[str] = None,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    stream: Optional[TextIO] = None,
    predictor=None,
    backend: str = "auto",
) -> Dict[str, object]:
    """The whole PerSeg evaluation (see the module doc); returns what scores.json holds."""
    stream = sys.stdout if stream is None else stream
    dataset = PerSegDataset(data)
    selected = _select_classes(dataset, classes)
    out_dir = Path(out)
    record: Dict[str, object] = {"dataset": "perseg", "data": str(dataset.root), "classes_evaluated": selected}
    pred_dir, fields = predictions_to_score(
        pred, out_dir, lambda p, d: predict_perseg(p, dataset, selected, d, method, progress),
        method, model_type, checkpoint, device, precision, predictor, backend=backend)
    record.update(fields)
    scores = score_perseg(dataset, selected, pred_dir)
    record.update(scores)

    header = ["class", "images", "IoU", "bIoU", "mean image IoU"]
    rows = [[c, s["n_images"], s["iou"], s["biou"], s["mean_image_iou"]] for c, s in scores["classes"].items()]
    rows.append(["mean", sum(s["n_images"] for s in scores["classes"].values()), scores["miou"], scores["mbiou"],
                 float(np.mean([s["mean_image_iou"] for s in scores["classes"].values()]))])
    print(format_table(header, rows), file=stream)
    timing = record.get("timing")
    if timing and timing["per_image"]["mean_s"] is not None:
        print(f"time per image: {timing['per_image']['mean_s']:.3f} s ({timing['per_image']['count']} images)", file=stream)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "scores.csv", ["class", "n_images", "iou", "biou", "mean_image_iou"], rows)
    write_json(out_dir / "scores.json", record)
    bar_chart(out_dir / "scores.png", [r[0] for r in rows],
              {"IoU": [r[2] for r in rows], "bIoU": [r[3] for r in rows]},
              f"PerSeg {record.get('method') or 'predictions'}: mIoU {scores['miou']:.3f}, mBIoU {scores['mbiou']:.3f}")
    return record
