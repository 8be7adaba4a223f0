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

:class:`VideoTracker` is that per-frame loop, shared by :func:`segment_video` (the DAVIS
runner) and ``persam track`` (persam.runs.track): it learns the objects on a reference frame (or
takes concepts learned elsewhere), then :meth:`VideoTracker.track` segments one frame and
reports per object whether it was found, its peak similarity, predicted IoU and box. With
``min_similarity`` an object whose peak similarity in a frame is below it is not decoded
there (not found, no forced mask); :meth:`VideoTracker.restart` continues after a frame
whose label map is known (resuming an interrupted run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import time

import numpy as np
import torch
from tqdm import tqdm

from sam.predictor import Prediction, SamPredictor

from persam.method.finetune import FinetuneSettings
from persam.method.guide import attention_similarity
from persam.method.locate import select_points, similarity_grid, similarity_map
from persam.method.pipeline import METHODS, Concept, learn_concept
from persam.method.refine import MaskChoice, best_mask, keep_non_empty, mask_box, mixed_mask

__all__ = ["segment_video", "masks_from_label_map", "merge_by_logits", "grow_box", "VideoPrompt", "VideoTracker",
           "FrameResult", "ObjectResult", "learn_concepts"]


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


@dataclass
class ObjectResult:
    """One object in one frame."""

    found: bool  # it has pixels in the frame's label map
    peak_similarity: Optional[float]  # highest target similarity of the object's concept in the frame
    iou_score: Optional[float]  # the decoder's predicted IoU; None when not decoded (reference, below min_similarity)
    box: Optional[np.ndarray]  # x0, y0, x1, y1 of its pixels in the label map; None when not found


@dataclass
class FrameResult:
    """One frame: the merged label map and every object's result."""

    label_map: np.ndarray  # H x W int32, 0 background
    objects: Dict[int, ObjectResult]
    reference: bool = False  # the reference frame: the given masks, not predicted
    encode_s: float = 0.0
    segment_s: float = 0.0  # locate + decode + merge


def _check_masks(masks: Mapping[int, np.ndarray], shape: Optional[Tuple[int, int]] = None) -> Dict[int, np.ndarray]:
    """{id: bool mask} sorted by id, checked: ids positive, masks non-empty and of the frame's size."""
    ids = sorted(int(i) for i in masks)
    if not ids:
        raise ValueError("segment_video needs at least one object mask for the first frame")
    for i in ids:
        if i <= 0:
            raise ValueError(f"object ids must be positive (0 is background), got {i}")
        if not np.any(masks[i]):
            raise ValueError(f"the first-frame mask of object {i} is empty")
    checked = {}
    for i in ids:
        mask = np.asarray(masks[i]).astype(bool)
        if shape is not None and mask.shape != tuple(shape):
            raise ValueError(f"the mask of object {i} is {mask.shape[1]}x{mask.shape[0]} but the frame is {shape[1]}x{shape[0]}")
        checked[i] = mask
    return checked


def _peak(predictor: SamPredictor, features: torch.Tensor, concept: Concept) -> float:
    return float(similarity_map(similarity_grid(features, concept.target_vector), predictor.upscale).max())


def learn_concepts(
    predictor: SamPredictor,
    image: np.ndarray,
    masks: Mapping[int, np.ndarray],
    method: str = "persam",
    finetune: Optional[FinetuneSettings] = None,
    encoded: Optional[Tuple[torch.Tensor, Tuple[int, int]]] = None,
) -> Dict[int, Concept]:
    """One concept per object ({id: H x W bool mask} on `image`, RGB uint8), the image encoded once
    (not at all when `encoded`, its (features, original size), is given)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    image = np.asarray(image)
    masks = _check_masks(masks, image.shape[:2])
    if encoded is None:
        encoded = (predictor.set_image(image), predictor.original_size)
    encoded = [encoded]
    return {i: learn_concept(predictor, [(image, masks[i])], method=method, finetune=finetune, encoded=encoded)
            for i in masks}


class VideoTracker:
    """PerSAM's per-frame video loop (see the module doc): every frame encoded once, all objects
    decoded together per stage, merged by the highest logit, prompted with the previous frame's
    box of each object.

        tracker, first = VideoTracker.learn(predictor, frame0, {1: mask})   # or VideoTracker(predictor, concepts)
        for frame in frames:
            result = tracker.track(frame)        # FrameResult: label map, per-object found / peak / IoU / box
    """

    def __init__(
        self,
        predictor: SamPredictor,
        concepts: Mapping[int, Concept],
        use_previous_box: bool = True,
        box_margin: float = 10.0,
        k_positive: int = 2,
        min_similarity: Optional[float] = None,
    ) -> None:
        self.ids = sorted(int(i) for i in concepts)
        if not self.ids:
            raise ValueError("VideoTracker needs at least one object")
        for i in self.ids:
            if i <= 0:
                raise ValueError(f"object ids must be positive (0 is background), got {i}")
        self.predictor = predictor
        self.concepts = {i: concepts[i] for i in self.ids}
        self.use_previous_box = use_previous_box
        self.box_margin = box_margin
        self.k_positive = k_positive
        self.min_similarity = min_similarity
        self.boxes: Dict[int, Optional[np.ndarray]] = {i: None for i in self.ids}
        self.shape: Optional[Tuple[int, int]] = None  # H x W of the frames, from the first one seen

    @classmethod
    def learn(
        cls,
        predictor: SamPredictor,
        frame: np.ndarray,
        masks: Mapping[int, np.ndarray],
        method: str = "persam",
        finetune: Optional[FinetuneSettings] = None,
        encoded: Optional[Tuple[torch.Tensor, Tuple[int, int]]] = None,
        **options,
    ) -> Tuple["VideoTracker", FrameResult]:
        """A tracker of the objects of `masks` ({id: bool mask}) learned on `frame` (encoded once, or
        `encoded` already), and that frame's result: the given masks (later ids on top where they
        overlap), whose boxes prompt the next frame. `options` go to the constructor."""
        frame = np.asarray(frame)
        masks = _check_masks(masks, frame.shape[:2])
        start = time.perf_counter()
        if encoded is None:
            encoded = (predictor.set_image(frame), predictor.original_size)
        encode_s = time.perf_counter() - start
        concepts = learn_concepts(predictor, frame, masks, method, finetune, encoded)
        predictor.set_embedding(*encoded)  # the peaks below are this frame's
        tracker = cls(predictor, concepts, **options)
        tracker.shape = frame.shape[:2]
        label_map = np.zeros(tracker.shape, dtype=np.int32)
        for i in tracker.ids:
            label_map[masks[i]] = i
        tracker.boxes = {i: mask_box(masks[i]) for i in tracker.ids}
        objects = {}
        for i in tracker.ids:
            box = mask_box(label_map == i)
            objects[i] = ObjectResult(box is not None, _peak(predictor, encoded[0], concepts[i]), None, box)
        return tracker, FrameResult(label_map, objects, True, encode_s, time.perf_counter() - start - encode_s)

    def restart(self, previous: Optional[Union[np.ndarray, Mapping[int, np.ndarray]]]) -> None:
        """Go on after a frame that is known: its H x W label map, or {id: mask} (a reference frame's
        masks), gives each object's previous box; None: no previous frame (no boxes)."""
        if previous is None:
            self.boxes = {i: None for i in self.ids}
            return
        if isinstance(previous, Mapping):
            self.boxes = {i: mask_box(np.asarray(previous[i], dtype=bool)) if i in previous else None for i in self.ids}
            return
        previous = np.asarray(previous)
        self.boxes = {i: mask_box(previous == i) for i in self.ids}

    def track(self, frame: np.ndarray) -> FrameResult:
        """Segment every object in `frame` (RGB uint8 H x W x 3, encoded once here)."""
        frame = np.asarray(frame)
        if self.shape is None:
            self.shape = frame.shape[:2]
        elif frame.shape[:2] != self.shape:
            shape = self.shape
            raise ValueError(f"frame size {frame.shape[1]}x{frame.shape[0]} differs from the first frame's {shape[1]}x{shape[0]}")
        info: Dict[str, object] = {}
        start = time.perf_counter()
        choices = _segment_frame(self.predictor, frame, self.ids, self.concepts,
                                 self.boxes if self.use_previous_box else None, self.box_margin, self.k_positive,
                                 self.min_similarity, info)
        decoded = [i for i in self.ids if i in choices]
        if decoded:
            label_map = merge_by_logits(decoded, [_choice_logits(choices[i]) for i in decoded])
        else:
            label_map = np.zeros(self.shape, dtype=np.int32)
        peaks = info.get("peaks", {})
        objects = {}
        for i in self.ids:
            self.boxes[i] = mask_box(label_map == i)
            objects[i] = ObjectResult(
                found=self.boxes[i] is not None,
                peak_similarity=peaks.get(i),
                iou_score=float(choices[i].iou_score) if i in choices else None,
                box=self.boxes[i],
            )
        total = time.perf_counter() - start
        encode_s = float(info.get("encode_s", 0.0))
        return FrameResult(label_map, objects, False, encode_s, total - encode_s)


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
    (`learn_concept`, `method` "persam" or "persam_f"), which is encoded once. The loop is
    :class:`VideoTracker`'s.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    _check_masks(first_masks)
    total = len(frames) if hasattr(frames, "__len__") else None  # type: ignore[arg-type]
    iterator = iter(frames)
    bar = tqdm(total=total, desc="frames", unit="frame", disable=not progress, leave=False)
    try:
        try:
            first = next(iterator)
        except StopIteration:
            return
        tracker, result = VideoTracker.learn(predictor, first, first_masks, method, finetune,
                                             use_previous_box=use_previous_box, box_margin=box_margin,
                                             k_positive=k_positive)
        bar.update(1)
        yield result.label_map
        for frame in iterator:
            result = tracker.track(frame)
            bar.update(1)
            yield result.label_map
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
    min_similarity: Optional[float] = None,
    info: Optional[Dict[str, object]] = None,
) -> Dict[int, MaskChoice]:
    """One frame: encode once, locate every object, decode all objects together per stage.

    An object whose peak similarity is below `min_similarity` is left out (no choice for it).
    `info`, when given, receives "peaks" ({id: peak similarity}) and "encode_s"."""
    start = time.perf_counter()
    features = predictor.set_image(frame)
    if info is not None:
        info["encode_s"] = time.perf_counter() - start
    height, width = frame.shape[:2]
    grid, img_size = features.shape[-1], predictor.model.img_size
    prompts: Dict[int, VideoPrompt] = {}
    peaks: Dict[int, float] = {}
    for i in ids:
        concept = concepts[i]
        persam = concept.method == "persam"
        similarity = similarity_map(similarity_grid(features, concept.target_vector), predictor.upscale)
        peaks[i] = float(similarity.max())
        if min_similarity is not None and peaks[i] < min_similarity:
            continue  # absent here: not forced
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
    if info is not None:
        info["peaks"] = peaks
    ids = [i for i in ids if i in prompts]

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
