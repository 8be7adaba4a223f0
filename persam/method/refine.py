"""Step 3, second half: cascaded post-refinement.

Refinement 1 feeds a prediction's low-resolution logits back as a mask
prompt; refinement 2 adds the box around the mask. Each keeps the mask with
the best predicted IoU. A prediction can come out empty: then there is no box
to draw, and the last non-empty mask is kept instead of crashing.

The refinements ask the decoder for the best of its three masks alone
(`best_only`: the IoU scores are read first, only that mask's logits are made)
and bring it to the image size only when needed (`best_upscaled`): the same
mask, logits and box as making and upscaling all three candidates. The chosen mask is
brought to full size when it is first read, so the guided prediction, passed on
as refinement 1's mask prompt, is upscaled only if refinement 1 comes out empty.
"""

import functools
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from sam.predictor import ImageEmbedding, Prediction, SamPredictor

from persam.method.finetune import mix_logits


class MaskChoice:
    """One chosen mask: H x W bool, its 256 x 256 logits, predicted IoU and full-size logits.

    Given `upscale` (low-res logits 1 x 1 x 256 x 256 -> 1 x 1 x H x W) instead of the mask,
    the full-size logits and mask are made when first read: a choice that is only passed on
    as the next mask prompt is never brought to full size.
    """

    def __init__(
        self,
        mask: Optional[np.ndarray],
        low_res_logits: np.ndarray,
        iou_score: float,
        logits: Optional[np.ndarray] = None,
        upscale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        threshold: float = 0.0,
    ) -> None:
        if mask is None and upscale is None:
            raise ValueError("a MaskChoice needs its mask or a way to upscale its low-res logits")
        self.low_res_logits = low_res_logits
        self.iou_score = iou_score
        self._mask = mask
        self._logits = logits
        self._upscale = upscale
        self._threshold = threshold

    def _bring_to_full_size(self) -> None:
        low_res = torch.from_numpy(np.ascontiguousarray(self.low_res_logits))[None, None]
        self._logits = self._upscale(low_res)[0, 0].cpu().numpy()
        self._mask = self._logits > self._threshold
        self._upscale = None

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._bring_to_full_size()
        return self._mask

    @property
    def logits(self) -> Optional[np.ndarray]:
        if self._logits is None and self._upscale is not None:
            self._bring_to_full_size()
        return self._logits

    @property
    def is_empty(self) -> bool:
        return not self.mask.any()


def best_mask(prediction: Prediction) -> MaskChoice:
    """The mask with the highest predicted IoU of a single (unbatched) prediction."""
    index = int(np.argmax(prediction.iou_scores))
    return MaskChoice(
        prediction.masks[index],
        prediction.low_res_logits[index],
        float(prediction.iou_scores[index]),
        prediction.logits[index],
    )


def best_upscaled(predictor: SamPredictor, prediction: Prediction, image: Optional[ImageEmbedding] = None) -> MaskChoice:
    """`best_mask` of a prediction decoded with full_size=False: only the chosen mask's low-res
    logits are brought to the original size (the very values `best_mask` would get), and only
    when its mask or logits are first read. `image`: the encoded image the prediction is of,
    when it is not the predictor's current one (`predict_each`)."""
    index = int(np.argmax(prediction.iou_scores))
    upscale = predictor.upscale if image is None else functools.partial(predictor.upscale_image, image)
    return MaskChoice(None, prediction.low_res_logits[index], float(prediction.iou_scores[index]),
                      upscale=upscale, threshold=predictor.model.mask_threshold)


def prediction_of(prediction: Prediction, index: int) -> Prediction:
    """Image `index`'s part of a `predict_each` prediction (low-res only), as `predict` gives it."""
    return Prediction(None, prediction.iou_scores[index], prediction.low_res_logits[index], None)


def full_size(predictor: SamPredictor, image: ImageEmbedding, prediction: Prediction) -> Prediction:
    """A low-res prediction of `image` with its masks and logits at the image's size, the values
    `predict(..., full_size=True)` gives."""
    logits = predictor.upscale_image(image, torch.from_numpy(np.ascontiguousarray(prediction.low_res_logits))[None])[0]
    logits = logits.cpu().numpy()
    return Prediction(logits > predictor.model.mask_threshold, prediction.iou_scores, prediction.low_res_logits, logits)


def mixed_mask(prediction: Prediction, scale_weights: torch.Tensor) -> MaskChoice:
    """PerSAM-F: a single multimask prediction's three masks mixed by the learned weights (3,).

    The mask is where the mixed full-size logits are > 0; the mixed low-res
    logits serve as the next mask prompt; the score is the mixed IoU estimate.
    """
    weights = scale_weights.to(torch.float32)
    logits = mix_logits(torch.from_numpy(prediction.logits), weights).numpy()
    low_res = mix_logits(torch.from_numpy(prediction.low_res_logits), weights).numpy()
    return MaskChoice(logits > 0, low_res, float(np.dot(weights.numpy(), prediction.iou_scores)), logits)


def mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight box (x0, y0, x1, y1) around a mask, None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def refine_with_mask(predictor: SamPredictor, points: np.ndarray, labels: np.ndarray, previous: MaskChoice) -> MaskChoice:
    """Refinement 1: the same points + the previous low-res logits as mask prompt, multimask, best."""
    return refine_with_masks(predictor, [predictor.current_image()], [points], [labels], [previous])[0]


def refine_with_box(predictor: SamPredictor, points: np.ndarray, labels: np.ndarray, previous: MaskChoice) -> MaskChoice:
    """Refinement 2: the same points + the box around the previous mask + its logits, multimask, best.

    Without a box (the previous mask is empty) the previous choice stands.
    """
    return refine_with_boxes(predictor, [predictor.current_image()], [points], [labels], [previous])[0]


def refine_with_masks(
    predictor: SamPredictor,
    images: Sequence[ImageEmbedding],
    points: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    previous: Sequence[MaskChoice],
) -> List[MaskChoice]:
    """`refine_with_mask` for several encoded images (each its own points, labels and previous
    choice, the same number of points each) in one decoder call."""
    return _refine_each(predictor, images, points, labels, previous, None)


def refine_with_boxes(
    predictor: SamPredictor,
    images: Sequence[ImageEmbedding],
    points: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    previous: Sequence[MaskChoice],
) -> List[MaskChoice]:
    """`refine_with_box` for several encoded images in one decoder call: those whose previous
    mask is empty have no box and keep their previous choice."""
    refined = list(previous)
    boxes = [mask_box(choice.mask) for choice in previous]
    boxed = [i for i, box in enumerate(boxes) if box is not None]
    if boxed:
        chosen = _refine_each(predictor, [images[i] for i in boxed], [points[i] for i in boxed],
                              [labels[i] for i in boxed], [previous[i] for i in boxed], [boxes[i] for i in boxed])
        for i, choice in zip(boxed, chosen):
            refined[i] = choice
    return refined


def _refine_each(
    predictor: SamPredictor,
    images: Sequence[ImageEmbedding],
    points: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    previous: Sequence[MaskChoice],
    boxes: Optional[Sequence[np.ndarray]],
) -> List[MaskChoice]:
    """One decoder call for a refinement of each image: its points (and box), its previous
    low-res logits as mask prompt, multimask, the best mask alone, kept only if not emptier."""
    prediction = predictor.predict_each(
        images,
        np.stack(points),
        np.stack(labels),
        boxes=None if boxes is None else np.stack(boxes),
        mask_input=np.stack([choice.low_res_logits[None] for choice in previous]),
        multimask_output=True,
        best_only=True,
    )
    return [keep_non_empty(best_upscaled(predictor, prediction_of(prediction, row), image), choice)
            for row, (image, choice) in enumerate(zip(images, previous))]


def keep_non_empty(new: MaskChoice, previous: MaskChoice) -> MaskChoice:
    """The new choice, unless it is empty and the previous one is not."""
    return previous if new.is_empty and not previous.is_empty else new
