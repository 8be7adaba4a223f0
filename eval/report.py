"""Shared parts of the evaluation runners: the model and the predictions' settings, tables, CSV / JSON and
bar charts."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from persam.errors import InputError, SettingError
from persam.data.io import atomic_write_bytes, atomic_write_text
from persam.runs.defaults import DEFAULT_PRECISION

from eval.outputs import SCORE_FILES, EvalFolder

__all__ = ["PredictionModel", "bar_chart", "check_prediction_size", "checkpoint_sha256",
           "format_table", "predictions_to_score", "prediction_settings", "split_names", "timing_summary", "write_csv",
           "write_json"]


@dataclass
class PredictionModel:
    """The model that makes a run's predictions: resolved before the output folder is touched,
    built only when something is left to predict (:meth:`predictor`)."""

    model_type: str
    checkpoint: Path
    device: str = "cpu"
    precision: str = DEFAULT_PRECISION
    backend: str = "auto"
    built: object = None  # the SamPredictor, once built (or given)

    @classmethod
    def resolve(cls, model_type: str, checkpoint: Optional[str], device: str = "cpu", precision: str = DEFAULT_PRECISION,
                backend: str = "auto", predictor=None) -> "PredictionModel":
        """`checkpoint` (default: the cached download of `model_type`; never downloads), checked to
        exist; InputError otherwise.  A `predictor` given is used as is, and `checkpoint` must name
        its weights (they are part of the predictions' settings)."""
        from persam.runs.models import resolve_checkpoint
        from sam.download import MODELS

        if model_type not in MODELS:
            raise InputError(f"unknown model {model_type!r}: one of {', '.join(sorted(MODELS))}")
        if predictor is not None and not checkpoint:
            raise ValueError("a predictor given needs its checkpoint file too (part of the predictions' settings)")
        return cls(model_type, resolve_checkpoint(model_type, checkpoint), device, precision, backend, predictor)

    def made_with(self) -> Dict[str, object]:
        """What of the model makes the masks, as `persam segment` records it: the model type, the
        checkpoint's sha256 and the encoder precision (not the device or the encoder backend)."""
        return {"model_type": self.model_type, "checkpoint_sha256": checkpoint_sha256(self.checkpoint),
                "precision": self.precision}

    def predictor(self):
        if self.built is None:
            from persam.runs.models import build_predictor

            self.built = build_predictor(self.model_type, self.checkpoint, self.device, self.precision, self.backend)
        return self.built


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file (a HuggingFace folder is resolved to its weights file by
    persam.runs.models.resolve_checkpoint, which `PredictionModel.resolve` takes it through)."""
    from persam.runs.key import file_sha256

    try:
        return file_sha256(path)
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path} ({exc.strerror or exc})") from None


def prediction_settings(benchmark: str, data: Path, method: str, model: PredictionModel,
                        **options: object) -> Dict[str, object]:
    """Everything that makes a benchmark run's predictions (their settings key, eval.json's
    ``made_with``): the benchmark and its data folder, the method and its settings, the model,
    and the benchmark's own `options`."""
    from persam.method.finetune import FinetuneSettings

    return {"benchmark": benchmark, "data": str(Path(data).resolve()), "method": method,
            "finetune": vars(FinetuneSettings()) if method == "persam_f" else None,
            **model.made_with(), **options}


def check_prediction_size(pred: np.ndarray, pred_path: Path, gt_shape: Tuple[int, int], gt_path: Path) -> None:
    """InputError when a predicted mask / label map is not the size of its ground truth."""
    h, w = int(gt_shape[0]), int(gt_shape[1])
    if tuple(pred.shape[:2]) != (h, w):
        raise InputError(
            f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but its ground truth {gt_path} is {w}x{h}"
        )


def predictions_to_score(
    pred: Optional[str],
    folder: EvalFolder,
    predictions: Sequence[str],
    predict: Callable[[object, Callable[[Path], bool]], Dict[str, object]],
    model: Optional[PredictionModel],
    method: Optional[str] = None,
    extra: Optional[Mapping[str, object]] = None,
) -> Tuple[Path, Dict[str, object]]:
    """The predictions a runner scores, and the fields of scores.json that describe them.

    With `pred`: that existing folder, nothing is run (method, model, key and timing are None).
    Otherwise the predictions of the run (`predictions`, relative to the folder) are planned in
    `folder` (those made earlier with the same settings are kept; conflicts raise InputError),
    the model is built when any is left to make, they and the score files are listed in
    eval.json, and ``predict(predictor, done)`` writes the missing ones into ``folder.pred_dir``
    (``done(path)``: kept from an earlier run) and returns its timing, to which the wall time
    ``total_s`` is added; `extra` fields go in before the timing.
    """
    if pred is not None:
        pred_dir = Path(pred)
        if not pred_dir.is_dir():
            raise SettingError(f"{{pred}} {pred_dir}: folder not found", "pred")
        folder.refuse_foreign(SCORE_FILES)
        return pred_dir, {"pred": str(pred_dir), "method": None, "model": None, "key": None, "made_with": None,
                          "timing": None}
    if model is None:
        raise ValueError("predictions_to_score needs `pred` or `model`")
    todo = folder.plan(predictions)
    predictor = model.predictor() if todo else None  # a checkpoint that does not load: nothing written yet
    folder.claim([*todo, *SCORE_FILES])
    start = time.perf_counter()
    timing = predict(predictor, folder.is_done)
    timing["total_s"] = time.perf_counter() - start
    fields: Dict[str, object] = {"pred": str(folder.pred_dir), "method": method, "model": model.model_type,
                                 "checkpoint": str(model.checkpoint), "device": model.device,
                                 "precision": model.precision, "backend": model.backend,
                                 "key": folder.key, "made_with": folder.made_with}
    fields.update(extra or {})
    fields["timing"] = timing
    return folder.pred_dir, fields


def clean_json(value):
    """numpy -> Python, NaN / inf -> None, so the JSON is strict."""
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, data: Mapping) -> None:
    atomic_write_text(path, json.dumps(clean_json(data), indent=2) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_cell(v) for v in row])
    atomic_write_text(path, buf.getvalue())


def _csv_cell(v):
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6f}"
    return v


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain aligned text table; floats with 4 decimals (NaN as -)."""

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "-" if not math.isfinite(float(v)) else f"{float(v):.4f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[k]) for r in cells]) for k, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


_COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148)]  # BGR


def bar_chart(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str) -> None:
    """Grouped bar chart (values in 0..1) drawn with OpenCV and written atomically as PNG."""
    names = list(series)
    n, k = len(labels), max(1, len(names))
    bar_w, gap, left, top, plot_h, bottom = 14, 18, 60, 70, 300, 140
    group_w = k * bar_w + gap
    width = max(420, left + n * group_w + 40)
    height = top + plot_h + bottom
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (left, 30), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    y0 = top + plot_h
    for tick in np.linspace(0, 1, 6):
        y = int(round(y0 - tick * plot_h))
        cv2.line(img, (left, y), (width - 20, y), (225, 225, 225), 1)
        cv2.putText(img, f"{tick:.1f}", (left - 40, y + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.line(img, (left, top), (left, y0), (0, 0, 0), 1)
    cv2.line(img, (left, y0), (width - 20, y0), (0, 0, 0), 1)
    for g, label in enumerate(labels):
        x = left + gap // 2 + g * group_w
        for s, name in enumerate(names):
            value = series[name][g]
            if value is None or not math.isfinite(float(value)):
                continue
            h = int(round(min(max(float(value), 0.0), 1.0) * plot_h))
            colour = _COLOURS[s % len(_COLOURS)]
            cv2.rectangle(img, (x + s * bar_w, y0 - h), (x + (s + 1) * bar_w - 2, y0), colour, -1)
        # rotated label: draw on a strip, rotate, paste
        text = label[:24]
        (tw, th), _ = cv2.getTextSize(text, font, 0.4, 1)
        strip = np.full((th + 6, tw + 4, 3), 255, np.uint8)
        cv2.putText(strip, text, (2, th + 2), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rotated = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
        rh, rw = rotated.shape[:2]
        px, py = x + max(0, (k * bar_w - rw) // 2), y0 + 6
        rh, rw = min(rh, height - py), min(rw, width - px)
        img[py:py + rh, px:px + rw] = np.minimum(img[py:py + rh, px:px + rw], rotated[:rh, :rw])
    for s, name in enumerate(names):  # legend
        x = left + s * 90
        cv2.rectangle(img, (x, 42), (x + 12, 54), _COLOURS[s % len(_COLOURS)], -1)
        cv2.putText(img, name, (x + 16, 53), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise InputError(f"cannot encode the chart {path}")
    atomic_write_bytes(path, data.tobytes())


def split_names(text: Optional[str]) -> Optional[List[str]]:
    """"a,b" -> ["a", "b"]; None stays None."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError("expected a comma-separated list of names")
    return names


def timing_summary(seconds: Sequence[float]) -> Dict[str, object]:
    values = [float(s) for s in seconds]
    return {
        "count": len(values),
        "total_s": float(sum(values)),
        "mean_s": float(np.mean(values)) if values else None,
        "median_s": float(np.median(values)) if values else None,
    }
