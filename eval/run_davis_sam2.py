"""DAVIS 2017 semi-supervised with SAM 2.1 (``persam eval davis --tracker sam2``).

The protocol of eval.run_davis (first-frame masks of every object, J and F as the official evaluation)
with sam.sam2.video.VideoTracker following the objects instead of PerSAM, set up as Meta evaluates SAM 2
(``tools/vos_inference.py`` without ``--apply_postprocessing``): no hole filling, no dynamic choice among
the decoder's masks by stability, and where objects overlap the highest logit wins (its
``non_overlap_masks`` for DAVIS-format outputs).  Each object has its own memory; every frame is encoded
once for all of them; the frames of a sequence are read one at a time (any length fits in memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from tqdm import tqdm

from persam.data.io import atomic_save_png, load_image
from persam.errors import SettingError

from eval.datasets import DavisDataset
from eval.report import PredictionModel, timing_summary

__all__ = ["Sam2PredictionModel", "evaluation_setup", "predict_davis_sam2"]


@dataclass
class Sam2PredictionModel(PredictionModel):
    """SAM 2.1 (`model_type` sam2.1_hiera_*) for the DAVIS runner: built in Meta's evaluation setup.
    `input_size` None: the model's 1024."""

    input_size: Optional[int] = None

    def made_with(self) -> Dict[str, object]:
        return {**super().made_with(), "tracker": "sam2", "input_size": self.input_size}

    def predictor(self):
        if self.built is None:
            import torch

            from sam.sam2.build import load_sam2

            if self.device == "cuda" and not torch.cuda.is_available():
                raise SettingError("{device} cuda: no CUDA GPU is available (use {device} cpu)", "device")
            model = load_sam2(self.model_type, self.checkpoint, device=self.device, image_size=self.input_size)
            self.built = evaluation_setup(model)
        return self.built


def evaluation_setup(model):
    """`model` (a Sam2Model) set up as Meta's evaluation builds it (build_sam2_video_predictor with
    apply_postprocessing off): no dynamic choice by stability, the conditioning frames' memories from the
    mask's probabilities (not binarised), no hole filling."""
    model.config = replace(model.config, dynamic_multimask_via_stability=False,
                           binarize_mask_from_pts_for_mem_enc=False, fill_hole_area=0)
    model.sam_mask_decoder.dynamic_multimask_via_stability = False
    return model


def _merge_highest_logit(shape, logits: Dict[int, np.ndarray]) -> np.ndarray:
    """{id: H x W logits} -> H x W uint8 label map: per pixel the object with the highest logit, where it is > 0."""
    if not logits:
        return np.zeros(shape, dtype=np.uint8)
    ids = sorted(logits)
    stacked = np.stack([logits[i] for i in ids])
    winner = np.asarray(ids)[stacked.argmax(0)]
    return np.where(stacked.max(0) > 0, winner, 0).astype(np.uint8)


def predict_davis_sam2(model, dataset: DavisDataset, sequences: Sequence[str], pred_dir: Path,
                       max_frames: Optional[int] = None, progress: bool = True,
                       done: Optional[Callable[[Path], bool]] = None) -> Dict[str, object]:
    """Write the results of the sequences whose frames are not all `done` (default: their files exist)
    with SAM 2.1 `model` (a Sam2Model); returns timings (seconds)."""
    from sam.sam2.video import VideoTracker

    done = done or Path.is_file
    first_times, frame_times, skipped = [], [], []
    for seq in tqdm(sequences, desc="DAVIS", unit="seq", disable=not progress):
        frames = dataset.frames(seq)[:max_frames] if max_frames else dataset.frames(seq)
        if all(done(pred_dir / seq / f"{name}.png") for name, _, _ in frames):
            skipped.append(seq)
            continue
        first = dataset.label_map(seq, frames[0][0])
        masks = {i: first == i for i in dataset.object_ids(seq) if np.any(first == i)}
        tracker = VideoTracker(model, next(model.parameters()).device, video_length=len(frames), fill_hole_area=0)
        for index, (name, image_path, _) in enumerate(tqdm(frames, desc=seq, unit="frame", leave=False,
                                                            disable=not progress)):
            start = time.perf_counter()
            image = load_image(image_path)
            results = tracker.step(index, image, masks if index == 0 else None)
            logits = {i: r.mask_logits for i, r in results.items()}
            label_map = _merge_highest_logit(image.shape[:2], logits)
            (first_times if index == 0 else frame_times).append(time.perf_counter() - start)
            atomic_save_png(pred_dir / seq / f"{name}.png", label_map, palette="davis")
    return {"first_frame": timing_summary(first_times), "per_frame": timing_summary(frame_times),
            "skipped_sequences": skipped}
