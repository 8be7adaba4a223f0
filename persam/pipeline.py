"""PerSAM and PerSAM-F: the steps of PERSAM_METHOD.md composed.

    learn_concept   step 1 (+ step 4 for PerSAM-F) on one or more references
    segment         steps 2 and 3 on a new image (encoded once)
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sam.predictor import SamPredictor

from .finetune import FinetuneSettings, learn_scale_weights
from .guide import attention_similarity, guided_prediction
from .locate import select_points, similarity_grid, similarity_map
from .refine import best_upscaled, mask_box, mixed_mask, refine_with_box, refine_with_mask
from .target import mask_area_on_grid, pool_target_features, target_cells, target_embedding, target_features, target_vector

METHODS = ("persam", "persam_f")
DEFAULT_TARGET_MODE = {"persam": "mean", "persam_f": "mean_max"}


@dataclass
class Concept:
    """What was learned about the user's object, enough to find it in new images."""

    method: str
    target_vector: torch.Tensor  # C, unit length
    target_embedding: torch.Tensor  # 1 x C
    scale_weights: Optional[torch.Tensor] = None  # 3, PerSAM-F only
    settings: Dict[str, object] = field(default_factory=dict)
    model_type: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    name: Optional[str] = None  # what the object is called (the COCO category of `--format coco`)


@dataclass
class Segmentation:
    """The object found in one image (or its absence)."""

    mask: np.ndarray  # H x W bool (empty when not found)
    iou_score: float  # the decoder's predicted IoU of the mask
    peak_similarity: float  # highest target similarity in the image
    found: bool
    points: np.ndarray  # N x 2 (x, y) prompt points
    labels: np.ndarray  # N
    box: Optional[np.ndarray] = None  # the refinement box, if any
    similarity: Optional[torch.Tensor] = None  # H x W similarity map
    low_res_logits: Optional[np.ndarray] = None  # 256 x 256 logits of the mask


def learn_concept(
    predictor: SamPredictor,
    references: Sequence[Tuple[np.ndarray, np.ndarray]],
    method: str = "persam",
    tau: float = 0.97,
    target_mode: Optional[str] = None,
    finetune: Optional[FinetuneSettings] = None,
    encoded: Optional[Sequence[Tuple[torch.Tensor, Tuple[int, int]]]] = None,
) -> Concept:
    """Learn a concept from (image, mask) references: RGB uint8 H x W x 3 and bool H x W each.

    `encoded` gives the references' embeddings and original sizes when they
    are already computed (then the images are not encoded again).

    Side effect: the predictor is left holding the LAST reference's embedding
    (set by encoding the references, or by PerSAM-F's `learn_concept_weights`,
    which sets each reference in turn), whatever image was set before the
    call. Set the image to segment afterwards (`segment(..., image)` or
    `predictor.set_image` / `set_embedding`); do not rely on an earlier one.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    target_mode = target_mode or DEFAULT_TARGET_MODE[method]
    if encoded is None:
        encoded = [(predictor.set_image(image), predictor.original_size) for image, _ in references]
    per_reference = []
    for (_, mask), (features, _) in zip(references, encoded):
        cells = target_cells(mask, tau, features.shape[-1], predictor.model.img_size)
        per_reference.append(target_features(features, cells))
    feats = pool_target_features(per_reference)
    concept = Concept(
        method=method,
        target_vector=target_vector(feats, target_mode),
        target_embedding=target_embedding(feats),
        settings={"tau": tau, "target_mode": target_mode},
    )
    if method == "persam_f":
        settings = finetune or FinetuneSettings()
        concept.scale_weights = learn_concept_weights(predictor, concept, references, encoded, settings)
        concept.settings.update(vars(settings))
    return concept


def learn_concept_weights(
    predictor: SamPredictor,
    concept: Concept,
    references: Sequence[Tuple[np.ndarray, np.ndarray]],
    encoded: Sequence[Tuple[torch.Tensor, Tuple[int, int]]],
    settings: FinetuneSettings,
    decode_every_step: bool = False,
) -> torch.Tensor:
    """PerSAM-F step 4 on every reference: positive point from its own similarity, multimask, no guidance.

    Each reference's embedding is set in `predictor` in turn (`set_embedding`), so afterwards the
    predictor holds the LAST reference's embedding, not the image set before the call.
    """
    native = settings.loss_resolution == "native"

    def reference_logits() -> List[torch.Tensor]:
        all_logits = []
        for features, original_size in encoded:
            predictor.set_embedding(features, original_size)
            similarity = similarity_map(similarity_grid(features, concept.target_vector), predictor.upscale)
            points, labels = select_points(similarity, k_positive=1, k_negative=0)
            prediction = predictor.predict(points, labels, multimask_output=True, full_size=not native)
            if native:
                rows, cols = _native_extent(predictor)
                all_logits.append(torch.from_numpy(prediction.low_res_logits[:, :rows, :cols]))
            else:
                all_logits.append(torch.from_numpy(prediction.logits))
        return all_logits

    targets = []
    for (_, mask), (features, original_size) in zip(references, encoded):
        if native:
            predictor.set_embedding(features, original_size)
            rows, cols = _native_extent(predictor)
            low_res_side = 4 * features.shape[-1]
            targets.append(mask_area_on_grid(mask, low_res_side, predictor.model.img_size)[:rows, :cols])
        else:
            targets.append(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
    return learn_scale_weights(reference_logits, targets, settings, decode_every_step=decode_every_step)


def _native_extent(predictor: SamPredictor) -> Tuple[int, int]:
    """Rows and columns of the decoder's low-res logits that cover the image (not the padding)."""
    low_res_side = 4 * predictor.features.shape[-1]
    scale = low_res_side / predictor.model.img_size
    return math.ceil(predictor.input_size[0] * scale), math.ceil(predictor.input_size[1] * scale)


def segment(
    predictor: SamPredictor,
    concept: Concept,
    image: Optional[np.ndarray] = None,
    min_similarity: Optional[float] = None,
    keep_similarity: bool = False,
) -> Segmentation:
    """Find the concept in `image` (encoded here once), or in the image already set when `image` is None.

    With `min_similarity`, an image whose peak similarity is below it gives
    an empty mask flagged as not found instead of a forced guess.
    """
    if image is not None:
        predictor.set_image(image)
    similarity = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
    return segment_at(predictor, concept, similarity, min_similarity, keep_similarity)


def segment_at(
    predictor: SamPredictor,
    concept: Concept,
    similarity: torch.Tensor,
    min_similarity: Optional[float] = None,
    keep_similarity: bool = False,
    negative_similarity: Optional[torch.Tensor] = None,
) -> Segmentation:
    """Steps 2 and 3 for the image set in `predictor`, from its H x W similarity map.

    `similarity` gives the peak, the positive point and (PerSAM) the guidance.
    `negative_similarity`, an H x W map, gives PerSAM's negative point (its
    argmin) instead when set: `segment_objects` passes the original map while
    `similarity` has its found objects suppressed to the minimum, where the
    argmin of the suppressed map could otherwise land. PerSAM-F has no
    negative point and ignores it.
    """
    if negative_similarity is not None and tuple(negative_similarity.shape) != tuple(similarity.shape):
        raise ValueError(f"negative_similarity is {tuple(negative_similarity.shape)} but similarity is {tuple(similarity.shape)}")
    peak = float(similarity.max())
    if min_similarity is not None and peak < min_similarity:
        empty = np.zeros(similarity.shape, dtype=bool)
        return Segmentation(empty, 0.0, peak, False, np.zeros((0, 2), np.float32), np.zeros(0, np.int64),
                            similarity=similarity if keep_similarity else None)
    if concept.method == "persam_f":
        choice, points, labels = _persam_f_steps(predictor, concept, similarity)
    else:
        choice, points, labels = _persam_steps(predictor, concept, similarity, negative_similarity)
    return Segmentation(
        mask=choice.mask,
        iou_score=choice.iou_score,
        peak_similarity=peak,
        found=not choice.is_empty,
        points=points,
        labels=labels,
        box=mask_box(choice.mask),
        similarity=similarity if keep_similarity else None,
        low_res_logits=choice.low_res_logits,
    )


def _persam_steps(
    predictor: SamPredictor,
    concept: Concept,
    similarity: torch.Tensor,
    negative_similarity: Optional[torch.Tensor] = None,
):
    """PerSAM: positive + negative point, guided first prediction, two refinements.

    The negative point is the argmin of `negative_similarity` when given, else of `similarity`.
    """
    points, labels = select_points(similarity, k_positive=1, k_negative=1)
    if negative_similarity is not None:
        negative, _ = select_points(negative_similarity, k_positive=0, k_negative=1)
        points = np.concatenate([points[:1], negative])
    attention = attention_similarity(similarity, predictor.input_size, predictor.features.shape[-1], predictor.model.img_size)
    first = guided_prediction(predictor, points, labels, attention, concept.target_embedding, full_size=False)
    choice = best_upscaled(predictor, first)  # brought to full size only if refinement 1 comes out empty
    choice = refine_with_mask(predictor, points, labels, choice)
    choice = refine_with_box(predictor, points, labels, choice)
    return choice, points, labels


def _persam_f_steps(predictor: SamPredictor, concept: Concept, similarity: torch.Tensor):
    """PerSAM-F: positive point, multimask mixed by the learned weights, then box refinements."""
    points, labels = select_points(similarity, k_positive=1, k_negative=0)
    choice = mixed_mask(predictor.predict(points, labels, multimask_output=True), concept.scale_weights)
    choice = refine_with_box(predictor, points, labels, choice)
    choice = refine_with_box(predictor, points, labels, choice)
    return choice, points, labels


class PerSAM:
    """Training-free PerSAM with the reference defaults (mean target, tau 0.97).

        persam = PerSAM(SamPredictor(build_sam("vit_h", checkpoint)))
        concept = persam.learn(reference_image, reference_mask)
        found = persam.segment(new_image, concept)
    """

    method = "persam"

    def __init__(self, predictor: SamPredictor, tau: float = 0.97, target_mode: Optional[str] = None,
                 min_similarity: Optional[float] = None) -> None:
        self.predictor = predictor
        self.tau = tau
        self.target_mode = target_mode
        self.min_similarity = min_similarity

    def _finetune_settings(self) -> Optional[FinetuneSettings]:
        return None

    def learn(self, image: np.ndarray, mask: np.ndarray, *more: Tuple[np.ndarray, np.ndarray]) -> Concept:
        """A concept from one reference (image, mask), or several: learn(image, mask, (image2, mask2), ...)."""
        references = [(image, mask), *more]
        return learn_concept(self.predictor, references, self.method, self.tau, self.target_mode, self._finetune_settings())

    def segment(self, image: np.ndarray, concept: Concept, keep_similarity: bool = False) -> Segmentation:
        return segment(self.predictor, concept, image, self.min_similarity, keep_similarity)


class PerSAMF(PerSAM):
    """PerSAM-F: PerSAM plus the two learned mask-scale weights (mean_max target, 1000 AdamW steps)."""

    method = "persam_f"

    def __init__(self, predictor: SamPredictor, tau: float = 0.97, target_mode: Optional[str] = None,
                 min_similarity: Optional[float] = None, finetune: Optional[FinetuneSettings] = None) -> None:
        super().__init__(predictor, tau, target_mode, min_similarity)
        self.finetune = finetune or FinetuneSettings()

    def _finetune_settings(self) -> Optional[FinetuneSettings]:
        return self.finetune
