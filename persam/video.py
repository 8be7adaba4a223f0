"""PerSAM on video (DAVIS 2017 semi-supervised): PERSAM_METHOD.md, "Video".

The first frame's masks give one concept per object (frame 0 is encoded once
for all of them). Every later frame is encoded once; per object the target is
located (k = 2 positive points, plus the negative point for PerSAM), decoded
with guidance and refined as in the single-image pipeline; optionally the
previous frame's box of the object, grown by `box_margin` px, and its centre
(a positive point) are added to the first prompt. All objects whose prompts
have the same shape go through the decoder in ONE batched call per stage; the
objects are then merged per pixel by the highest logit, background where no
object's logit is > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from sam.predictor import Prediction, SamPredictor

from .finetune import FinetuneSettings
from .guide import attention_similarity
from .locate import select_points, similarity_grid, similarity_map
from .pipeline import METHODS, Concept, learn_concept
from .refine import MaskChoice, best_mask, keep_non_empty, mask_box, mixed_mask

__all__ = ["segment_video", "masks_from_label_map", "merge_by_logits", "grow_box", "VideoPrompt"]


@dataclass
class VideoPrompt:
    """One object's prompt for one decoding stage."""

    points: np.ndarray  # N x 2 (x, y)
    labels: np.ndarray  # N
    box: Optional[np.ndarray] = None  # 4
    mask_input: Optional[np.ndarray] = None  # 1 x 256 x 256
    attention: Optional[torch.Tensor] = None  # grid * grid
    embedding: Optional[torch.Tensor] = None  # 1 x C

    def signature(self) -> Tuple:
        """Prompts with equal signatures can be stacked into one batched decoder call."""
        return (len(self.points), self.box is not None, self.mask_input is not None,
                self.attention is not None, self.embedding is not None)


def decode_batched(predictor: SamPredictor, prompts: Sequence[VideoPrompt], multimask_output: bool) -> List[Prediction]:
    """Decode several prompts against the image set in `predictor`: one decoder call per group of
    prompts with the same signature (one call in all when they match). Returns one unbatched
    Prediction per prompt, in order."""
    groups: Dict[Tuple, List[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.signature(), []).append(index)
    results: List[Optional[Prediction]] = [None] * len(prompts)
    for indices in groups.values():
        group = [prompts[i] for i in indices]
        first = group[0]
        prediction = predictor.predict(
            point_coords=np.stack([p.points for p in group]).astype(np.float32),
            point_labels=np.stack([p.labels for p in group]),
            box=None if first.box is None else np.stack([p.box for p in group]).astype(np.float32),
            mask_input=None if first.mask_input is None else np.stack([p.mask_input for p in group]),
            multimask_output=multimask_output,
            attention_similarity=None if first.attention is None else torch.stack([p.attention for p in group]),
            target_embedding=None if first.embedding is None else torch.cat([p.embedding.reshape(1, -1) for p in group]),
        )
        for k, i in enumerate(indices):
            results[i] = Prediction(prediction.masks[k], prediction.iou_scores[k],
                                    prediction.low_res_logits[k], prediction.logits[k])
    return results  # type: ignore[return-value]


def grow_box(box: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """A box (x0, y0, x1, y1) grown by `margin` pixels on every side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([max(0.0, x0 - margin), max(0.0, y0 - margin),
                     min(width - 1.0, x1 + margin), min(height - 1.0, y1 + margin)], dtype=np.float32)


def merge_by_logits(object_ids: Sequence[int], logits: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel the object with the highest logit; 0 (background) where no logit is > 0."""
    stacked = np.stack([np.asarray(l, dtype=np.float32) for l in logits])
    winner = stacked.argmax(0)
    ids = np.asarray(object_ids, dtype=np.int32)
    return np.where(stacked.max(0) > 0, ids[winner], 0).astype(np.int32)


def masks_from_label_map(label_map: np.ndarray, object_ids: Optional[Iterable[int]] = None) -> Dict[int, np.ndarray]:
    """{object id: bool mask} from an H x W label map (0 background, 255 void left out)."""
    if object_ids is None:
        object_ids = [int(i) for i in np.unique(label_map) if i not in (0, 255)]
    return {int(i): np.asarray(label_map) == int(i) for i in object_ids}


def _choice_logits(choice: MaskChoice) -> np.ndarray:
    if choice.logits is not None:
        return choice.logits
    return np.where(choice.mask, 1.0, -1.0).astype(np.float32)


def segment_video(
    predictor: SamPredictor,
    frames: Iterable[np.ndarray],
    first_masks: Mapping[int, np.ndarray],
    method: str = "persam",
    use_previous_box: bool = True,
    progress: bool = True,
    box_margin: float = 10.0,
    k_positive: int = 2,
    finetune: Optional[FinetuneSettings] = None,
) -> Iterator[np.ndarray]:
    """Segment the objects of `first_masks` (id -> H x W bool mask in the first frame) in every
    frame (RGB uint8 H x W x 3); yields one H x W int32 label map per frame (0 background).

    The first label map is the given masks. Concepts are learned per object on frame 0
    (`learn_concept`, `method` "persam" or "persam_f"), which is encoded once.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    ids = sorted(int(i) for i in first_masks)
    if not ids:
        raise ValueError("segment_video needs at least one object mask for the first frame")
    for i in ids:
        if i <= 0:
            raise ValueError(f"object ids must be positive (0 is background), got {i}")
        if not np.any(first_masks[i]):
            raise ValueError(f"the first-frame mask of object {i} is empty")
    total = len(frames) if hasattr(frames, "__len__") else None  # type: ignore[arg-type]
    iterator = iter(frames)
    bar = tqdm(total=total, desc="frames", unit="frame", disable=not progress, leave=False)
    try:
        try:
            first = next(iterator)
        except StopIteration:
            return
        first = np.asarray(first)
        shape = first.shape[:2]
        masks = {}
        for i in ids:
            mask = np.asarray(first_masks[i]).astype(bool)
            if mask.shape != shape:
                raise ValueError(f"the mask of object {i} is {mask.shape[1]}x{mask.shape[0]} but the frame is {shape[1]}x{shape[0]}")
            masks[i] = mask
        encoded = [(predictor.set_image(first), predictor.original_size)]
        concepts = {
            i: learn_concept(predictor, [(first, masks[i])], method=method, finetune=finetune, encoded=encoded)
            for i in ids
        }
        label_map = np.zeros(shape, dtype=np.int32)
        for i in ids:
            label_map[masks[i]] = i
        boxes: Dict[int, Optional[np.ndarray]] = {i: mask_box(masks[i]) for i in ids}
        bar.update(1)
        yield label_map

        for frame in iterator:
            frame = np.asarray(frame)
            if frame.shape[:2] != shape:
                raise ValueError(f"frame size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's {shape[1]}x{shape[0]}")
            choices = _segment_frame(predictor, frame, ids, concepts, boxes if use_previous_box else None,
                                     box_margin, k_positive)
            label_map = merge_by_logits(ids, [_choice_logits(choices[i]) for i in ids])
            for i in ids:
                boxes[i] = mask_box(label_map == i)
            bar.update(1)
            yield label_map
    finally:
        bar.close()


def _segment_frame(
    predictor: SamPredictor,
    frame: np.ndarray,
    ids: Sequence[int],
    concepts: Mapping[int, Concept],
    previous_boxes: Optional[Mapping[int, Optional[np.ndarray]]],
    box_margin: float,
    k_positive: int,
) -> Dict[int, MaskChoice]:
    """One frame: encode once, locate every object, decode all objects together per stage."""
    features = predictor.set_image(frame)
    height, width = frame.shape[:2]
    grid, img_size = features.shape[-1], predictor.model.img_size
    prompts: Dict[int, VideoPrompt] = {}
    for i in ids:
        concept = concepts[i]
        persam = concept.method == "persam"
        similarity = similarity_map(similarity_grid(features, concept.target_vector), predictor.upscale)
        points, labels = select_points(similarity, k_positive=k_positive, k_negative=1 if persam else 0)
        box = None
        previous = previous_boxes.get(i) if previous_boxes is not None else None
        if previous is not None:
            box = grow_box(previous, box_margin, width, height)
            centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]], dtype=np.float32)
            points = np.concatenate([points[:k_positive], centre, points[k_positive:]])
            labels = np.concatenate([labels[:k_positive], [1], labels[k_positive:]]).astype(np.int64)
        prompts[i] = VideoPrompt(
            points.astype(np.float32), labels.astype(np.int64), box,
            attention=attention_similarity(similarity, predictor.input_size, grid, img_size) if persam else None,
            embedding=concept.target_embedding if persam else None,
        )

    # first prediction
    choices: Dict[int, MaskChoice] = {}
    persam_ids = [i for i in ids if concepts[i].method == "persam"]
    persam_f_ids = [i for i in ids if concepts[i].method == "persam_f"]
    if persam_ids:  # guided, single mask (mask token 0)
        for i, prediction in zip(persam_ids, decode_batched(predictor, [prompts[i] for i in persam_ids], False)):
            choices[i] = best_mask(prediction)
    if persam_f_ids:  # multimask, no guidance, mixed by the learned weights
        for i, prediction in zip(persam_f_ids, decode_batched(predictor, [prompts[i] for i in persam_f_ids], True)):
            choices[i] = mixed_mask(prediction, concepts[i].scale_weights)

    # refinement 1: PerSAM: points + mask prompt; PerSAM-F: points + box of the mask + mask prompt
    _refine(predictor, prompts, choices, [i for i in persam_ids], with_box=False)
    _refine(predictor, prompts, choices, [i for i in persam_f_ids], with_box=True)
    # refinement 2: points + box of the mask + mask prompt
    _refine(predictor, prompts, choices, list(ids), with_box=True)
    return choices


def _refine(
    predictor: SamPredictor,
    prompts: Mapping[int, VideoPrompt],
    choices: Dict[int, MaskChoice],
    ids: Sequence[int],
    with_box: bool,
) -> None:
    """One cascaded refinement for `ids`, all in one batched call (multimask, best, never emptier)."""
    todo, stage = [], []
    for i in ids:
        box = mask_box(choices[i].mask) if with_box else None
        if with_box and box is None:
            continue  # an empty mask has no box: the previous choice stands
        todo.append(i)
        stage.append(VideoPrompt(prompts[i].points, prompts[i].labels, box, choices[i].low_res_logits[None]))
    if not todo:
        return
    for i, prediction in zip(todo, decode_batched(predictor, stage, True)):
        choices[i] = keep_non_empty(best_mask(prediction), choices[i])
