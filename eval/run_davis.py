"""DAVIS 2017 semi-supervised evaluation of the PerSAM video pipeline.

    OUT/pred/<seq>/<frame>.png    results: palette PNGs named like the annotations
    OUT/scores.csv, scores.json   J, F (mean / recall / decay) and J&F per object, per
                                  sequence and overall; timings
    OUT/scores.png                bar chart per sequence
    OUT/eval.json                 the files persam wrote here, the settings of the results

The output folder keeps persam's promises (eval.outputs): a sequence whose result frames were
all made earlier with the same settings is skipped (resume), results made with other settings
(another method, model, checkpoint, precision, resolution, --max-frames or previous-box
prompting) are refused unless ``overwrite``, no file persam did not write is replaced. With
``pred`` nothing is run: the results there (``<seq>/<frame>.png``) are scored. First and last
frames are excluded from the scores, as in the official evaluation.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np
from tqdm import tqdm

from persam.errors import InputError, SettingError
from persam.data.io import atomic_save_png, load_image, load_label_map
from persam.runs.defaults import DEFAULT_MODEL, DEFAULT_PRECISION

from eval.datasets import DavisDataset
from eval.metrics import davis_sequence_scores, davis_summary
from eval.outputs import PRED_FOLDER, SCORE_FILES, EvalFolder
from eval.report import (PredictionModel, bar_chart, check_prediction_size, format_table,
                     prediction_settings, predictions_to_score, timing_summary, write_csv, write_json)

__all__ = ["run_davis", "predict_davis", "score_davis"]


def _frames(dataset: DavisDataset, seq: str, max_frames: Optional[int]):
    frames = dataset.frames(seq)
    return frames[:max_frames] if max_frames else frames


def predict_davis(predictor, dataset: DavisDataset, sequences: Sequence[str], pred_dir: Path, method: str,
                  max_frames: Optional[int] = None, use_previous_box: bool = True,
                  progress: bool = True, done: Optional[Callable[[Path], bool]] = None) -> Dict[str, object]:
    """Write the results of the sequences whose frames are not all `done` (default: their files
    exist); returns timings (seconds)."""
    from persam.method.video import masks_from_label_map, segment_video

    done = done or Path.is_file
    first_times, frame_times, skipped = [], [], []
    for seq in tqdm(sequences, desc="DAVIS", unit="seq", disable=not progress):
        frames = _frames(dataset, seq, max_frames)
        if all(done(pred_dir / seq / f"{name}.png") for name, _, _ in frames):
            skipped.append(seq)
            continue
        first = dataset.label_map(seq, frames[0][0])
        masks = masks_from_label_map(first, dataset.object_ids(seq))
        images = (load_image(path) for _, path, _ in frames)
        results = segment_video(predictor, images, masks, method=method, use_previous_box=use_previous_box,
                                progress=progress)
        for k, (name, _, _) in enumerate(frames):
            start = time.perf_counter()
            label_map = next(results)
            (first_times if k == 0 else frame_times).append(time.perf_counter() - start)
            atomic_save_png(pred_dir / seq / f"{name}.png", label_map, palette="davis")
        results.close()
    return {"first_frame": timing_summary(first_times), "per_frame": timing_summary(frame_times),
            "skipped_sequences": skipped}


def _check_object_ids(labels, path: Path, object_ids: Sequence[int], seq: str, first_gt: Path) -> None:
    """InputError for a predicted object id that the ground truth does not have (the official
    DAVIS evaluation refuses such files too)."""
    extra = sorted(set(int(i) for i in np.unique(labels)) - {0} - set(object_ids))
    if extra:
        ids = ", ".join(str(i) for i in object_ids) or "none"
        raise InputError(
            f"prediction {path} has object id {extra[0]}{' (and ' + str(len(extra) - 1) + ' more)' if len(extra) > 1 else ''}"
            f" that is not in the ground truth of sequence {seq} (ids {ids} in {first_gt}); "
            f"use the first frame's ids, 0 for background"
        )


def score_davis(dataset: DavisDataset, sequences: Sequence[str], pred_dir: Path,
                max_frames: Optional[int] = None) -> Dict[str, object]:
    """Per-sequence (and per-object) J / F scores and the dataset summary."""
    per_sequence = {}
    for seq in sequences:
        frames = _frames(dataset, seq, max_frames)
        missing = [str(pred_dir / seq / f"{name}.png") for name, _, _ in frames
                   if not (pred_dir / seq / f"{name}.png").is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise InputError(f"sequence {seq}: missing results {', '.join(missing[:5])}{more}")
        gt = [load_label_map(mask) if mask is not None else None for _, _, mask in frames]
        first_gt = frames[0][2]
        object_ids = dataset.object_ids(seq)
        pred = []
        for (name, _, mask), truth in zip(frames, gt):
            path = pred_dir / seq / f"{name}.png"
            labels = load_label_map(path)
            check_prediction_size(labels, path, (truth if truth is not None else gt[0]).shape,
                                  mask if truth is not None else first_gt)
            _check_object_ids(labels, path, object_ids, seq, first_gt)
            pred.append(labels)
        per_sequence[seq] = davis_sequence_scores(gt, pred, object_ids)
    return {"sequences": per_sequence, "summary": davis_summary(per_sequence.values())}


def run_davis(
    data: str,
    out: str,
    method: str = "persam",
    model_type: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    sequences: Optional[Sequence[str]] = None,
    max_frames: Optional[int] = None,
    pred: Optional[str] = None,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    year: str = "2017",
    split: Optional[str] = "val",
    resolution: str = "480p",
    use_previous_box: bool = True,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    predictor=None,
    backend: str = "auto",
    overwrite: bool = False,
    tracker: str = "persam",
    input_size: Optional[int] = None,
) -> Dict[str, object]:
    """The whole DAVIS evaluation (see the module doc); returns what scores.json holds.

    `tracker` "sam2": SAM 2.1 (`model_type` sam2.1_hiera_*, at `input_size`, default 1024) follows the
    first-frame masks instead of PerSAM (eval.run_davis_sam2); `method` and `use_previous_box` do not apply.

    Everything is checked before `out` is touched; InputError (one line) on bad input and on a
    conflict with what `out` holds (results made with other settings without `overwrite`, a
    file persam did not write)."""
    stream = sys.stdout if stream is None else stream
    dataset = DavisDataset(data, year=year, split=split, resolution=resolution)
    if sequences is None:
        selected = dataset.sequences()
    else:
        unknown = [s for s in sequences if s not in dataset.sequences()]
        if unknown:
            raise InputError(f"unknown DAVIS sequence(s): {', '.join(unknown)} (available: {', '.join(dataset.sequences())})")
        selected = list(sequences)
    if max_frames is not None and max_frames < 1:
        raise SettingError(f"{{max_frames}} must be at least 1, got {max_frames}", "max_frames")
    out_dir = Path(out)
    model, made_with = None, None
    predict = partial(predict_davis, method=method, use_previous_box=use_previous_box)
    if tracker == "sam2":
        from eval.run_davis_sam2 import Sam2PredictionModel, predict_davis_sam2

        method, use_previous_box, predict = "sam2", None, predict_davis_sam2
    elif tracker != "persam":
        raise SettingError(f"{{tracker}} must be persam or sam2, not {tracker!r}", "tracker")
    if pred is None:
        resolve = Sam2PredictionModel.resolve if tracker == "sam2" else PredictionModel.resolve
        model = resolve(model_type, checkpoint, device, precision, backend, predictor)
        if tracker == "sam2":
            model.input_size = input_size
        made_with = prediction_settings("davis", Path(data), method, model, resolution=resolution,
                                        max_frames=max_frames, use_previous_box=use_previous_box)
    record: Dict[str, object] = {"dataset": f"davis{year}", "data": str(data), "split": split,
                                 "sequences_evaluated": selected, "max_frames": max_frames}
    with EvalFolder(out_dir, made_with, overwrite) as folder:
        predictions = [f"{PRED_FOLDER}/{seq}/{name}.png" for seq in selected
                       for name, _, _ in _frames(dataset, seq, max_frames)]
        pred_dir, fields = predictions_to_score(
            pred, folder, predictions,
            lambda p, done: predict(p, dataset, selected, folder.pred_dir, max_frames=max_frames, progress=progress,
                                    done=done),
            model, method, extra={"use_previous_box": use_previous_box})
        record.update(fields)
        scores = score_davis(dataset, selected, pred_dir, max_frames)
        record.update(scores)
        _report(record, scores, out_dir, folder, stream)
    return record


def _report(record: Dict[str, object], scores: Dict[str, object], out_dir: Path, folder: EvalFolder,
            stream: TextIO) -> None:
    """The tables on `stream`; scores.csv, scores.json and scores.png in `out_dir`."""
    metric_cols = ["J&F", "J mean", "J recall", "J decay", "F mean", "F recall", "F decay"]

    def stats_row(r) -> List[float]:
        j, f = r.get("J_stats", r.get("J")), r.get("F_stats", r.get("F"))
        return [(j["mean"] + f["mean"]) / 2, j["mean"], j["recall"], j["decay"], f["mean"], f["recall"], f["decay"]]

    object_rows = [[seq, obj, *stats_row(r)] for seq, s in scores["sequences"].items() for obj, r in s["objects"].items()]
    sequence_rows = [[seq, *stats_row(s)] for seq, s in scores["sequences"].items()]
    summary_row = ["all", *stats_row(scores["summary"])]
    print("per object", file=stream)
    print(format_table(["sequence", "object", *metric_cols], object_rows), file=stream)
    print("\nper sequence", file=stream)
    print(format_table(["sequence", *metric_cols], sequence_rows + [summary_row]), file=stream)
    timing = record.get("timing")
    if timing and timing["per_frame"]["mean_s"] is not None:
        print(f"time per frame: {timing['per_frame']['mean_s']:.3f} s ({timing['per_frame']['count']} frames "
              "after the first)", file=stream)
    folder.claim(SCORE_FILES)
    write_csv(out_dir / "scores.csv", ["sequence", "object", *metric_cols],
              object_rows + [[r[0], "all", *r[1:]] for r in sequence_rows] + [["all", "all", *summary_row[1:]]])
    write_json(out_dir / "scores.json", record)
    labels = [r[0] for r in sequence_rows] + ["all"]
    rows = sequence_rows + [summary_row]
    bar_chart(out_dir / "scores.png", labels,
              {"J": [r[2] for r in rows], "F": [r[5] for r in rows], "J&F": [r[1] for r in rows]},
              f"DAVIS {record.get('method') or 'results'}: J&F {scores['summary']['J&F']:.3f}")
