"""GF-SAM, "Bridge the Points: Graph-based Few-shot Segment Anything Semantically" (Zhang et al.,
NeurIPS 2024): every instance of the references' category, training-free, from DINOv2 patch
matches that prompt SAM.

The steps, one function each (the graph steps are in persam.method.gfsam_graph):

    frame_image / feature_grid / dinov2_pixels   how SAM and DINOv2 see a photo
    token_features        DINOv2 patch tokens of a photo (normalised over tokens, as the original)
    similarity_prior      max and mean similarity of each target token to a reference region
    filtered_prior        the positive priors mixed, minus where the negative prior wins
    top_cells             the grid cells of the (at most 128) highest filtered values
    prompt_points         those cells as SAM prompt points
    point_masks           one SAM mask per point, decoder calls batched
    then gfsam_graph: graph, weak components, mask growth, point consistency, selection.

GFSAM composes them (learn / segment, like persam.method.pipeline.PerSAM).

Photos of any size. The official loaders feed 1024 x 1024 squares. Here a photo first goes to
SAM's input frame (longest side 1024, Pillow's bilinear resize: sam.transforms.resize_longest_side,
the square loaders' resize on a square photo), which SAM encodes as usual (padded). DINOv2 sees
that frame resized (bilinear, no antialias, as the original resizes 1024 to 518) to a grid of
about the official 37 x 37 = 1369 patches with the photo's aspect kept (518 x 518 for a square).
A reference mask is sampled at its photo's grid directly (the original samples its 1024 x 1024
copy). SAM's masks are compared on the grid in the frame; only the kept masks are brought to the
photo's size. On a 1024 x 1024 photo every step is the original's (tests/method/test_gfsam_parity.py).

The score, and "not found". The original always returns a mask. Here `score` is the highest
positive prior (the cosine similarity of a target patch to its best-matching reference foreground
patch, averaged over the references) at the prompt points whose masks were kept; with
`min_similarity` set, an image scoring below it is answered "not found" (empty mask). Where even
the image's highest positive prior is below `min_similarity`, SAM is not run and that peak is the
score. PerSAM's peak similarity compares SAM features to the MEAN reference feature; this one
takes the BEST reference patch and DINOv2's features, so it runs higher for the same photo
(thresholds do not carry over between the methods).
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sam.dinov2 import IMAGENET_MEAN, IMAGENET_STD, dinov2_variant_of
from sam.predictor import ImageEmbedding, SamPredictor
from sam.transforms import resize_longest_side

from persam.errors import InputError
from persam.method import gfsam_graph as graph

METHOD = "gfsam"


@dataclass(frozen=True)
class GFSAMSettings:
    """The official one-shot evaluation's defaults (main_eval.py and matcher/GFSAM.py)."""

    # GFSAM.find_points: `topk = min(int(sim_map.sum()), 128)`, the most prompt points
    max_points: int = 128
    # GFSAM.__init__: `img_size = 518`, DINOv2's square input side (37 x 37 patches); a
    # non-square photo gets about as many patches, its aspect kept
    dinov2_side: int = 518
    # GFSAM.generate_sam_masks: `batch_iterator(64, ...)`, prompt points per decoder call
    decode_batch: int = 64
    # not in the original (it always answers): below this score the image is "not found"
    min_similarity: Optional[float] = None


@dataclass
class GFSAMReference:
    """One reference as the method keeps it."""

    features: torch.Tensor  # N x C DINOv2 patch tokens, normalised over the tokens (token_features)
    grid: Tuple[int, int]  # (rows, cols) of the patch grid, rows * cols = N
    foreground: torch.Tensor  # N: the mask sampled at the grid (bilinear, align_corners=True)
    background: torch.Tensor  # N: (1 - mask) sampled likewise


@dataclass
class GFSAMConcept:
    """What GF-SAM learned from the references: their DINOv2 features and masks."""

    references: List[GFSAMReference]
    dinov2_variant: Optional[str] = None  # "vits14", ... (sam.dinov2)
    dinov2_sha256: Optional[str] = None  # the DINOv2 checkpoint's sha256, when known
    settings: Dict[str, object] = field(default_factory=dict)
    method: str = METHOD
    name: Optional[str] = None
    model_type: Optional[str] = None  # the SAM it was saved with ("vit_t", ...), when recorded
    checkpoint_sha256: Optional[str] = None  # that SAM checkpoint's sha256, when recorded


@dataclass
class GFSAMSegmentation:
    """The category's instances found in one image (or their absence)."""

    mask: np.ndarray  # H x W bool, the union of the kept masks (empty when not found)
    instances: List[np.ndarray]  # H x W bool each: a kept component's union of kept masks
    score: float  # see the module docstring
    found: bool
    points: np.ndarray  # n x 2 (x, y) prompt points in the photo's pixels
    point_labels: np.ndarray  # n: gfsam_graph.KEPT / CANDIDATE / DROPPED
    components: np.ndarray  # n: each point's component (candidate object)


# ------------------------------------------------------------------------------------------
# how SAM and DINOv2 see a photo


def frame_image(image: np.ndarray, side: int = 1024) -> np.ndarray:
    """SAM's input frame of an RGB uint8 photo: longest side `side` (h x w x 3 uint8, unpadded)."""
    return resize_longest_side(np.asarray(image), side)


def feature_grid(height: int, width: int, side: int = 518, patch: int = 14) -> Tuple[int, int]:
    """DINOv2's patch grid (rows, cols) for an image: about (side / patch)^2 patches, aspect kept."""
    tokens = (side // patch) ** 2
    scale = math.sqrt(tokens / (height * width))
    rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
    if rows == 1 or cols == 1:  # a sliver: one row (or column) of `tokens` patches
        rows, cols = min(rows, tokens), min(cols, tokens)
    return rows, cols


def dinov2_pixels(frame: np.ndarray, grid: Tuple[int, int], patch: int = 14) -> torch.Tensor:
    """DINOv2's input 1 x 3 x (rows*14) x (cols*14) from a uint8 frame h x w x 3.

    0..1, bilinear resize without antialias (torchvision 0.14's tensor Resize, which the original
    runs on its 1024 x 1024 tensors), then ImageNet mean and std.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float().div(255)
    size = (grid[0] * patch, grid[1] * patch)
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size, mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def mask_on_grid(mask: np.ndarray, grid: Tuple[int, int]) -> torch.Tensor:
    """A mask H x W (bool or 0/1) sampled at the patch grid: rows*cols float (bilinear,
    align_corners=True, as the original samples its reference masks)."""
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(values, grid, mode="bilinear", align_corners=True).flatten()


# ------------------------------------------------------------------------------------------
# features and priors


@torch.inference_mode()
def token_features(dinov2: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """DINOv2's patch tokens N x C (last block, before the final norm) of a 1 x 3 x H x W input.

    Quirk: each channel is normalised to unit length over the image's tokens (the original's
    ``F.normalize(feats, dim=1)`` on B x N x C), which weighs the channels of the cosine
    similarities below; kept.
    """
    device = next(dinov2.parameters()).device
    features = dinov2.patch_features(pixels.to(device)).float()  # 1 x C x rows x cols
    tokens = features[0].flatten(1).transpose(0, 1).cpu()  # N x C, row-major cells
    return F.normalize(tokens, dim=0, p=2)


def token_similarity(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cosine similarities rows x columns of two token sets (Nr x C, Nc x C), with the original's
    1e-7 added to the norms' product."""
    products = torch.bmm(rows[None], columns[None].permute(0, 2, 1))
    row_norms = rows.norm(p=2, dim=1, keepdim=True)[None]
    column_norms = columns.norm(p=2, dim=1, keepdim=True)[None].permute(0, 2, 1)
    norms = torch.bmm(row_norms, column_norms)
    return (products / (norms + 1e-7))[0]


def similarity_prior(target: torch.Tensor, references: Sequence[Tuple[torch.Tensor, torch.Tensor]]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max prior N, mean prior N) of the target's tokens (N x C) against weighted reference
    regions [(tokens Nr x C, weights Nr)], each averaged over the references.

    max: the highest weighted similarity to a reference token; mean: the weighted mean similarity
    over the reference's tokens divided by the weights' mean (the region's mean similarity).
    The original divides by the weights' sum over the TARGET's token count; the counts are equal
    on its square inputs, and the reference's count keeps the meaning for references of other
    aspects.
    """
    max_priors, mean_priors = [], []
    for tokens, weights in references:
        weighted = token_similarity(tokens, target) * weights[:, None]  # Nr x N
        mean_priors.append(weighted.mean(0) / (weights.sum() / tokens.shape[0] + 1e-7))
        max_priors.append(weighted.max(0).values)
    return torch.stack(max_priors).mean(0), torch.stack(mean_priors).mean(0)


def _min_max(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min() + 1e-6)


def filtered_prior(max_prior: torch.Tensor, mean_prior: torch.Tensor,
                   negative_mean_prior: torch.Tensor) -> torch.Tensor:
    """The map the points come from: (mean * max) scaled to 0..1, zero where the negative mean
    prior (scaled to 0..1) is higher."""
    mixed = _min_max(mean_prior * max_prior)
    return mixed * ~(_min_max(negative_mean_prior) > mixed)


def top_cells(filtered: torch.Tensor, max_points: int = 128) -> np.ndarray:
    """Cells (column, row) n x 2 of the highest values of a rows x cols map: int(sum) of them (at
    least one where the sum is positive), at most `max_points`.

    Quirk: ordered by column, then row (the original's ``argwhere(hot.T)``); the order numbers
    the graph's components, which break ties.
    """
    total = filtered.sum()
    count = min(int(total), max_points)
    if count == 0 and total > 0:
        count = 1
    hot = torch.zeros(filtered.numel())
    hot[filtered.flatten().topk(count).indices] = 1
    return np.argwhere(hot.view(filtered.shape).numpy().T > 0)


def prompt_points(cells: np.ndarray, grid: Tuple[int, int], frame_size: Tuple[int, int]) -> np.ndarray:
    """Cells (column, row) -> points (x, y) in SAM's input frame h x w, int64.

    Quirk: a cell's top-left corner, not its centre, truncated to whole pixels (the original
    scales cell indices by 1024 / 37 and casts to int); kept.
    """
    rows, cols = grid
    height, width = frame_size
    scaled = cells.astype(np.float64) * np.array([width / cols, height / rows])
    return scaled.astype(np.int64)


@torch.inference_mode()
def point_masks(predictor: SamPredictor, frame: ImageEmbedding, points: np.ndarray, batch: int = 64,
                upscale_batch: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """One single-output SAM mask per point (x, y in the input frame) -> (low-res logits n x 1 x
    256 x 256, masks n x h x w bool in the frame), `batch` points per decoder call.

    `frame` is the photo's embedding with the frame as its original size, so the points and masks
    are in the frame without rescaling."""
    decoder = predictor.sibling()
    decoder.set_embedding(frame.features, frame.original_size, frame.input_size)
    coords = torch.as_tensor(points, dtype=torch.float32)[:, None, :]
    labels = torch.ones(len(points), 1, dtype=torch.int64)
    low_res = torch.cat([decoder.predict_torch(coords[i:i + batch], labels[i:i + batch], multimask_output=False,
                                               full_size=False).low_res_logits
                         for i in range(0, len(points), batch)])
    masks = torch.cat([decoder.upscale(low_res[i:i + upscale_batch]) > predictor.model.mask_threshold
                       for i in range(0, len(points), upscale_batch)])
    return low_res, masks[:, 0].cpu()


# ------------------------------------------------------------------------------------------
# the method


def check_reference(image: np.ndarray, mask: np.ndarray, which: int) -> np.ndarray:
    """The reference mask as bool, or InputError for one that cannot teach the method."""
    mask, size = np.asarray(mask), tuple(np.asarray(image).shape[:2])
    if mask.shape != size:
        raise InputError(f"reference {which}: the mask's shape {mask.shape} is not the image's {size}")
    mask = mask.astype(bool)
    if not mask.any():
        raise InputError(f"reference {which}: the mask is empty (no foreground pixels)")
    if mask.all():
        raise InputError(f"reference {which}: the mask covers the whole image (no background pixels)")
    return mask


def learn_reference(dinov2: torch.nn.Module, image: np.ndarray, mask: np.ndarray, settings: GFSAMSettings,
                    frame_side: int = 1024) -> GFSAMReference:
    """One reference's features and mask on its patch grid (image and mask at the photo's size)."""
    frame = frame_image(image, frame_side)
    grid = feature_grid(frame.shape[0], frame.shape[1], settings.dinov2_side)
    background = 1 - mask.astype(np.float32)  # sampled itself, as the original samples 1 - mask
    return GFSAMReference(features=token_features(dinov2, dinov2_pixels(frame, grid)), grid=grid,
                          foreground=mask_on_grid(mask, grid), background=mask_on_grid(background, grid))


class GFSAM:
    """GF-SAM with the official defaults: every instance of the references' category.

    The official evaluation runs COCO-20i, FSS-1000 and LVIS-92i with the same method settings
    (its scripts pass only the benchmark, fold and shots) on DINOv2 ViT-L/14 and SAM ViT-H
    (main_eval.py's defaults); GFSAMSettings holds those settings, the models are the caller's.

        gfsam = GFSAM(SamPredictor(build_sam("vit_h", checkpoint)), load_dinov2("vitl14", weights))
        concept = gfsam.learn(reference_image, reference_mask)         # or several pairs
        found = gfsam.segment(new_image, concept)   # found.mask, found.instances, found.score
    """

    method = METHOD

    def __init__(self, predictor: SamPredictor, dinov2: torch.nn.Module, settings: GFSAMSettings = GFSAMSettings(),
                 dinov2_sha256: Optional[str] = None) -> None:
        self.predictor = predictor
        self.dinov2 = dinov2
        self.settings = settings
        self.dinov2_variant = dinov2_variant_of(dinov2.state_dict())
        self.dinov2_sha256 = dinov2_sha256

    def learn(self, image: np.ndarray, mask: np.ndarray, *more: Tuple[np.ndarray, np.ndarray]) -> GFSAMConcept:
        """A concept from one reference (image, mask), or several: learn(image, mask, (image2, mask2), ...)."""
        pairs = [(image, mask), *more]
        references = [learn_reference(self.dinov2, pair_image, check_reference(pair_image, pair_mask, i + 1),
                                      self.settings, self.predictor.model.img_size)
                      for i, (pair_image, pair_mask) in enumerate(pairs)]
        return GFSAMConcept(references, self.dinov2_variant, self.dinov2_sha256, asdict(self.settings))

    def check_concept(self, concept: GFSAMConcept) -> None:
        """InputError for a concept learned by another method or DINOv2 model."""
        if getattr(concept, "method", None) != METHOD:
            raise InputError(f"the concept was learned with {getattr(concept, 'method', '?')!r}, not {METHOD!r}")
        if concept.dinov2_variant != self.dinov2_variant or (
                concept.dinov2_sha256 and self.dinov2_sha256 and concept.dinov2_sha256 != self.dinov2_sha256):
            raise InputError(f"the concept was learned with DINOv2 {concept.dinov2_variant} "
                             f"({concept.dinov2_sha256 or 'unknown weights'}), not {self.dinov2_variant} "
                             f"({self.dinov2_sha256 or 'unknown weights'})")

    def segment(self, image: np.ndarray, concept: GFSAMConcept) -> GFSAMSegmentation:
        """Every instance of the concept in an RGB uint8 photo (any size)."""
        self.check_concept(concept)
        return segment(self.predictor, self.dinov2, concept, image, self.settings)


def _not_found(shape: Tuple[int, int], score: float, points: Optional[np.ndarray] = None,
               point_labels: Optional[np.ndarray] = None, components: Optional[np.ndarray] = None) -> GFSAMSegmentation:
    count = 0 if points is None else len(points)
    return GFSAMSegmentation(np.zeros(shape, dtype=bool), [], score, False,
                             np.zeros((0, 2), np.float32) if points is None else points,
                             np.zeros(count, np.int64) if point_labels is None else point_labels,
                             np.zeros(count, np.int64) if components is None else components)


def segment(predictor: SamPredictor, dinov2: torch.nn.Module, concept: GFSAMConcept, image: np.ndarray,
            settings: GFSAMSettings = GFSAMSettings()) -> GFSAMSegmentation:
    """GF-SAM on one photo: priors, points, one mask per point, the graph, the kept masks.

    The predictor is left holding the photo's embedding.
    """
    image = np.asarray(image)
    shape = tuple(image.shape[:2])
    frame = frame_image(image, predictor.model.img_size)
    grid = feature_grid(frame.shape[0], frame.shape[1], settings.dinov2_side)
    target = token_features(dinov2, dinov2_pixels(frame, grid))
    max_prior, mean_prior = similarity_prior(target, [(r.features, r.foreground) for r in concept.references])
    _, negative_mean = similarity_prior(target, [(r.features, r.background) for r in concept.references])
    peak = float(max_prior.max())
    if settings.min_similarity is not None and peak < settings.min_similarity:
        return _not_found(shape, peak)

    cells = top_cells(filtered_prior(max_prior, mean_prior, negative_mean).view(grid), settings.max_points)
    if len(cells) == 0:
        return _not_found(shape, 0.0)
    predictor.set_torch_image(torch.from_numpy(frame).permute(2, 0, 1)[None], shape)
    photo = predictor.current_image()
    in_frame = ImageEmbedding(photo.features, photo.input_size, photo.input_size)
    frame_points = prompt_points(cells, grid, photo.input_size)
    low_res, masks = point_masks(predictor, in_frame, frame_points, settings.decode_batch)

    nearest, bilinear = graph.masks_on_grid(masks, grid)
    count, components = graph.weak_components(graph.point_mask_graph(nearest, cells))
    squared = (mean_prior * mean_prior).view(grid)
    negative = (negative_mean * ((mean_prior.max() + mean_prior.min()) / 2)).view(grid)
    grown, last_score = graph.grow_masks(bilinear, components, count, squared - negative, squared > negative)
    unions = graph.component_unions(masks, components, count, grid)
    point_labels = graph.point_consistency(token_similarity(target, target), unions, cells, components, count, grown)
    chosen = graph.select_masks(point_labels, last_score, masks.flatten(1).any(dim=1).numpy())

    points = (frame_points * np.array([shape[1] / frame.shape[1], shape[0] / frame.shape[0]])).astype(np.float32)
    full = predictor.upscale_image(photo, low_res[chosen]) > predictor.model.mask_threshold
    full = full[:, 0].cpu().numpy()
    instances = [full[[k for k, i in enumerate(chosen) if components[i] == c]].any(axis=0)
                 for c in sorted({int(components[i]) for i in chosen})]
    union = full.any(axis=0)
    score = float(max_prior.view(grid)[cells[chosen, 1], cells[chosen, 0]].max())
    found = bool(union.any()) and (settings.min_similarity is None or score >= settings.min_similarity)
    if not found:
        return _not_found(shape, score, points, point_labels, components)
    return GFSAMSegmentation(union, [m for m in instances if m.any()], score, True, points, point_labels, components)
