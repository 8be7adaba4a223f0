"""PerSAM and PerSAM-F: the steps of PERSAM_METHOD.md composed.

    learn_concept   step 1 (+ step 4 for PerSAM-F) on one or more references
    segment         steps 2 and 3 on a new image (encoded once)
    segment_images  steps 2 and 3 on several encoded images, each decoder call made for all of
                    them at once (the fixed costs of a call are shared: quicker per image)
    each_on_one_thread  a step for several images side by side, each image's arithmetic on one
                    torch thread (what `persam segment / apply` runs on a CPU, in either engine:
                    the same bits whatever the machine's thread count and the images beside it)
"""

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from sam.predictor import ImageEmbedding, SamPredictor

from persam.method.finetune import FinetuneSettings, learn_scale_weights
from persam.method.guide import attention_similarity, guided_predictions
from persam.method.locate import select_points, similarity_grid, similarity_map
from persam.method.refine import best_upscaled, full_size, mask_box, mixed_mask, prediction_of, refine_with_boxes, refine_with_masks
from persam.method.target import mask_area_on_grid, pool_target_features, target_cells, target_embedding, target_features, target_vector

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
    similarity = locate(predictor, concept, predictor.current_image())
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
    return segment_images_at(predictor, concept, [predictor.current_image()], [similarity], min_similarity,
                             keep_similarity, [negative_similarity])[0]


def locate(predictor: SamPredictor, concept: Concept, image: ImageEmbedding) -> torch.Tensor:
    """Step 2's H x W similarity map of an encoded image (of any size; not the current one)."""
    upscale = functools.partial(predictor.upscale_image, image)
    return similarity_map(similarity_grid(image.features, concept.target_vector), upscale)


def segment_images(
    predictor: SamPredictor,
    concept: Concept,
    images: Sequence[ImageEmbedding],
    min_similarity: Optional[float] = None,
    keep_similarity: bool = False,
    workers: int = 1,
) -> List[Segmentation]:
    """`segment` for several encoded images (``predictor.encode_images``), in order.

    Each decoder call of the method is made once for all the images (those still taking it),
    which shares the call's fixed costs; image i's values are those of segmenting it alone to
    float rounding (tests/method/test_segment_images.py). The current image is not changed.

    workers > 1, on a CPU: the images are split into up to `workers` groups (in order) made side
    by side in threads, torch's threads shared out among them. Each thread then runs its small
    operations without waiting for the others, and one thread's Python runs while the other's
    products do, so the groups side by side mostly take a little less time than one worker on all
    the threads (scripts/bench_pipeline.py; docs/performance.md, Several photos per decoder call).
    Each group's values are those of one worker on the same thread count; on
    another thread count torch's kernels may round differently, which can move a mask's pixel.
    `decode_workers` gives the number worth taking. On a GPU it is ignored.

    `persam segment / apply` on a CPU decode each image alone on one thread instead
    (`each_on_one_thread`), whose values do not depend on the group or the thread count.
    """
    groups = _worker_groups(len(images), workers if predictor.device.type == "cpu" else 1)
    if len(groups) <= 1:
        return _locate_and_segment(predictor, concept, images, min_similarity, keep_similarity)
    def segment_group(group: range) -> List[Segmentation]:
        return _locate_and_segment(predictor.sibling(), concept, [images[i] for i in group], min_similarity,
                                   keep_similarity)

    threads_each = max(1, torch.get_num_threads() // len(groups))
    parts = _side_by_side(segment_group, groups, threads_each, len(groups), "persam-decode")
    return [segmentation for part in parts for segmentation in part]


def decode_workers(predictor: SamPredictor, count: int) -> int:
    """The `workers` worth taking for `segment_images` or `each_on_one_thread` of `count` images:
    on a CPU one per torch thread, at most one per image; on a GPU 1."""
    if predictor.device.type != "cpu":
        return 1
    return max(1, min(count, torch.get_num_threads()))


Item = TypeVar("Item")
Result = TypeVar("Result")


def each_on_one_thread(predictor: SamPredictor, step: Callable[[SamPredictor, Item], Result],
                       items: Sequence[Item], workers: int = 1) -> List[Result]:
    """``[step(predictor.sibling(), item) for item in items]``: on a CPU each call runs on one
    torch thread, up to `workers` calls side by side in threads of their own (`decode_workers`);
    on another device, one after the other in this thread. In order; the first error is raised
    (after the calls already running end); the caller's torch thread count is restored.

    Why one thread: torch's CPU results depend on its thread count. With one thread it takes
    other kernels (the image encoder's 1 x 1 convolutions run as PyTorch's own matrix product,
    with more threads as oneDNN's convolution: embeddings differ by about 3e-6), and products
    may split their sums over the threads (a similarity peak moved by 2e-7 between 1 and 2
    threads). The decoder's values also depend on the images decoded with it in one call
    (`segment_images`: logits move by about 1e-5). Such differences move a mask's pixel, a
    prompt point, a score. So `persam segment / apply` segment each image alone on one thread,
    in both engines: a Ray worker with one CPU and a local run on any number of cores write the
    same bits (on the same kind of CPU). Each call gets a predictor of its own (`sibling`: the
    same model and encoder), so the caller's current image is not changed."""
    items = list(items)
    if predictor.device.type != "cpu":
        return [step(predictor.sibling(), item) for item in items]
    return _side_by_side(lambda item: step(predictor.sibling(), item), items, 1, workers, "persam-image")


def _side_by_side(run: Callable[[Item], Result], items: Sequence[Item], threads_each: int, workers: int,
                  name: str) -> List[Result]:
    """``[run(item) for item in items]`` in order, each call with `threads_each` torch threads, up to
    `workers` calls side by side in threads of their own (in this thread when one is enough). The
    first error is raised after the calls already running end; the caller's thread count is restored."""
    threads = torch.get_num_threads()

    def on_its_thread(item: Item) -> Result:
        torch.set_num_threads(threads_each)  # this thread's own: its OpenMP team and MKL's
        return run(item)

    try:
        if workers <= 1 or len(items) <= 1:
            return [on_its_thread(item) for item in items]
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix=name) as pool:
            return list(pool.map(on_its_thread, items))
    finally:
        torch.set_num_threads(threads)  # also the count that threads started later begin with


def _worker_groups(count: int, workers: int) -> List[range]:
    """`count` images in order as up to `workers` groups of near-equal size (the larger first)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    workers = min(workers, count)
    if workers <= 1:
        return [range(count)]
    size, extra = divmod(count, workers)
    bounds = [0]
    for index in range(workers):
        bounds.append(bounds[-1] + size + (1 if index < extra else 0))
    return [range(start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def _locate_and_segment(predictor: SamPredictor, concept: Concept, images: Sequence[ImageEmbedding],
                        min_similarity: Optional[float], keep_similarity: bool) -> List[Segmentation]:
    similarities = [locate(predictor, concept, image) for image in images]
    return segment_images_at(predictor, concept, images, similarities, min_similarity, keep_similarity)


def segment_images_at(
    predictor: SamPredictor,
    concept: Concept,
    images: Sequence[ImageEmbedding],
    similarities: Sequence[torch.Tensor],
    min_similarity: Optional[float] = None,
    keep_similarity: bool = False,
    negative_similarities: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> List[Segmentation]:
    """`segment_at` for several encoded images, each with its similarity map (and, optionally,
    its negative similarity map), their decoder calls made together."""
    negatives = list(negative_similarities) if negative_similarities is not None else [None] * len(images)
    if not (len(images) == len(similarities) == len(negatives)):
        raise ValueError(f"{len(images)} images, {len(similarities)} similarity maps and {len(negatives)} negative maps")
    for similarity, negative in zip(similarities, negatives):
        if negative is not None and tuple(negative.shape) != tuple(similarity.shape):
            raise ValueError(f"negative_similarity is {tuple(negative.shape)} but similarity is {tuple(similarity.shape)}")
    results: List[Optional[Segmentation]] = [None] * len(images)
    peaks = [float(similarity.max()) for similarity in similarities]
    searched = []
    for i, (similarity, peak) in enumerate(zip(similarities, peaks)):
        if min_similarity is not None and peak < min_similarity:
            empty = np.zeros(similarity.shape, dtype=bool)
            results[i] = Segmentation(empty, 0.0, peak, False, np.zeros((0, 2), np.float32), np.zeros(0, np.int64),
                                      similarity=similarity if keep_similarity else None)
        else:
            searched.append(i)
    if searched:
        chosen = [images[i] for i in searched]
        maps = [similarities[i] for i in searched]
        if concept.method == "persam_f":
            choices, points, labels = _persam_f_steps(predictor, concept, chosen, maps)
        else:
            choices, points, labels = _persam_steps(predictor, concept, chosen, maps, [negatives[i] for i in searched])
        for i, choice, image_points, image_labels in zip(searched, choices, points, labels):
            results[i] = Segmentation(
                mask=choice.mask,
                iou_score=choice.iou_score,
                peak_similarity=peaks[i],
                found=not choice.is_empty,
                points=image_points,
                labels=image_labels,
                box=mask_box(choice.mask),
                similarity=similarities[i] if keep_similarity else None,
                low_res_logits=choice.low_res_logits,
            )
    return results


def _persam_steps(
    predictor: SamPredictor,
    concept: Concept,
    images: Sequence[ImageEmbedding],
    similarities: Sequence[torch.Tensor],
    negative_similarities: Sequence[Optional[torch.Tensor]],
):
    """PerSAM on each image: positive + negative point, guided first prediction, two refinements.

    An image's negative point is the argmin of its negative similarity map when given, else of
    its similarity map.
    """
    points, labels, attentions = [], [], []
    for image, similarity, negative_similarity in zip(images, similarities, negative_similarities):
        image_points, image_labels = select_points(similarity, k_positive=1, k_negative=1)
        if negative_similarity is not None:
            negative, _ = select_points(negative_similarity, k_positive=0, k_negative=1)
            image_points = np.concatenate([image_points[:1], negative])
        points.append(image_points)
        labels.append(image_labels)
        attentions.append(attention_similarity(similarity, image.input_size, image.features.shape[-1],
                                               predictor.model.img_size))
    first = guided_predictions(predictor, images, points, labels, attentions, concept.target_embedding)
    # each brought to full size only if its refinement 1 comes out empty
    choices = [best_upscaled(predictor, prediction_of(first, i), image) for i, image in enumerate(images)]
    choices = refine_with_masks(predictor, images, points, labels, choices)
    choices = refine_with_boxes(predictor, images, points, labels, choices)
    return choices, points, labels


def _persam_f_steps(predictor: SamPredictor, concept: Concept, images: Sequence[ImageEmbedding],
                    similarities: Sequence[torch.Tensor]):
    """PerSAM-F on each image: positive point, multimask mixed by the learned weights, then box refinements."""
    selected = [select_points(similarity, k_positive=1, k_negative=0) for similarity in similarities]
    points, labels = [p for p, _ in selected], [l for _, l in selected]
    prediction = predictor.predict_each(images, np.stack(points), np.stack(labels), multimask_output=True)
    choices = [mixed_mask(full_size(predictor, image, prediction_of(prediction, i)), concept.scale_weights)
               for i, image in enumerate(images)]
    choices = refine_with_boxes(predictor, images, points, labels, choices)
    choices = refine_with_boxes(predictor, images, points, labels, choices)
    return choices, points, labels


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
