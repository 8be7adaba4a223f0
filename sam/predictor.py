"""Encode an image once, then decode masks from as many prompts as asked."""

import copy
import os
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backends import make_encoder, resolve_backend
from .precision import EmulatedBF16Warning, autocast_context
from .sam import Sam
from .transforms import preprocess_shape, resize_longest_side, scale_boxes, scale_coords

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Prediction:
    """Decoder output for M masks, with a leading batch axis B for batched prompts.

    masks: [B x] M x H x W bool at the original size; iou_scores: [B x] M;
    low_res_logits: [B x] M x 256 x 256 (feed one back as `mask_input`);
    logits: [B x] M x H x W at the original size (mask = logits > 0).
    Arrays are numpy from `predict`, tensors from `predict_torch`.
    """

    masks: Optional[ArrayLike]  # None when decoded with full_size=False
    iou_scores: ArrayLike
    low_res_logits: ArrayLike
    logits: Optional[ArrayLike]  # None when decoded with full_size=False


class ImageEmbedding(NamedTuple):
    """One encoded image: `predictor.set_embedding(*embedding)` makes it the current image."""

    features: torch.Tensor  # 1 x 256 x 64 x 64
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


class SamPredictor:
    """Keeps one image's embedding and decodes prompts against it.

    precision: "fp32" (default), or "bf16" / "fp16" to run the image encoder
    in reduced precision (bf16 on CPU; either on GPU). The decoder always runs in fp32.

    backend: who runs the image encoder (see sam.backends): "auto" (default: OpenVINO,
    then ONNX Runtime, when installed and the model is on the CPU, else torch), "torch",
    "openvino" or "onnxruntime". A compiled backend exports the encoder once per weights
    and precision into `cache_dir` (default: the checkpoint cache's compiled/ folder),
    at the first encoded image or at `prepare()`; `checkpoint_sha256` (the checkpoint
    file's sha256) names the weights there, else they are hashed.
    """

    def __init__(
        self,
        sam_model: Sam,
        precision: str = "fp32",
        backend: Optional[str] = "auto",
        cache_dir: Union[str, "os.PathLike[str]", None] = None,
        checkpoint_sha256: Optional[str] = None,
    ) -> None:
        self.model = sam_model
        self.precision = precision
        autocast_context(self.device, precision)  # validates the mode for this device
        self._auto_backend = backend in (None, "auto")
        self.backend = resolve_backend(backend, self.device, precision)
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and runs several times "
                "slower than fp32 here; use precision='fp32'",
                EmulatedBF16Warning,
                stacklevel=2,
            )
        self._encoder_options = {"sha256": checkpoint_sha256, "cache_dir": cache_dir}
        self._encoder = None
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self):
        """Build (or load from the cache) the image encoder's runner now; returns it.

        Otherwise this happens at the first encoded image. With backend "auto", a compiled
        backend that fails to build falls back to torch with a warning.
        """
        if self._encoder is None:
            try:
                self._encoder = make_encoder(self.model, self.backend, self.precision, **self._encoder_options)
            except Exception as exc:  # noqa: BLE001 - "auto" must not fail where torch works
                if not self._auto_backend or self.backend == "torch":
                    raise
                warnings.warn(f"the {self.backend} image encoder could not be built ({type(exc).__name__}: {exc}); "
                              "using torch", RuntimeWarning, stacklevel=2)
                self.backend = "torch"
                self._encoder = make_encoder(self.model, "torch", self.precision)
        return self._encoder

    def encode(self, model_input: torch.Tensor) -> torch.Tensor:
        """Image embeddings B x 256 x 64 x 64 (fp32, on the model's device) of normalised, padded
        B x 3 x S x S inputs (`Sam.preprocess`), in one call of the backend's encoder."""
        return self.prepare()(model_input).to(self.device, torch.float32)

    def sibling(self) -> "SamPredictor":
        """A predictor over the same model and encoder with its own current image and caches: one
        per thread when threads decode side by side (a current image is not shared between threads)."""
        twin = copy.copy(self)
        twin.reset_image()
        return twin

    def reset_image(self) -> None:
        self.features: Optional[torch.Tensor] = None
        # the decoder-layout features of the images decoded last (`_stacked_features`)
        self._stacked_cache: Optional[Tuple[List[torch.Tensor], torch.Tensor]] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @torch.inference_mode()
    def set_image(self, image: ArrayLike) -> torch.Tensor:
        """Encode an RGB uint8 image H x W x 3 (numpy or tensor); returns its 1 x 256 x 64 x 64 embedding.

        The image is resized exactly as SAM's own `set_image` does (Pillow's
        bilinear resize of the uint8 pixels, see sam.transforms).
        """
        pixels = _as_rgb_array(image)
        resized = torch.from_numpy(resize_longest_side(pixels, self.model.img_size)).to(self.device)
        return self.set_torch_image(resized.permute(2, 0, 1)[None], tuple(pixels.shape[:2]))

    @torch.inference_mode()
    def set_torch_image(self, resized_image: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
        """Encode an already resized 1 x 3 x h x w image (0..255, longest side = input side)."""
        if resized_image.dim() != 4 or resized_image.shape[:2] != (1, 3):
            raise ValueError(f"expected a 1 x 3 x h x w image, got shape {tuple(resized_image.shape)}")
        if max(resized_image.shape[-2:]) != self.model.img_size:
            raise ValueError(f"the longest side must be {self.model.img_size}, got {tuple(resized_image.shape[-2:])}")
        self.reset_image()
        features = self.encode(self.model.preprocess(resized_image.to(self.device, torch.float32)))
        self.set_embedding(features, original_size, tuple(resized_image.shape[-2:]))
        return self.features

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ArrayLike], batch_size: Optional[int] = None) -> List[ImageEmbedding]:
        """Encode RGB uint8 images (any sizes) several per encoder call: `batch_size` per call
        (default all at once). Returns one ImageEmbedding per image, in order; the current image
        is not changed (`set_embedding(*embedding)` selects one)."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        pixels = [_as_rgb_array(image) for image in images]
        step = batch_size or max(1, len(pixels))
        embeddings: List[ImageEmbedding] = []
        for start in range(0, len(pixels), step):
            chunk = pixels[start:start + step]
            resized = [torch.from_numpy(resize_longest_side(p, self.model.img_size)) for p in chunk]
            batch = torch.cat([self.model.preprocess(r.to(self.device).permute(2, 0, 1)[None].float()) for r in resized])
            features = self.encode(batch)
            for i, (p, r) in enumerate(zip(chunk, resized)):
                embeddings.append(ImageEmbedding(features[i:i + 1].clone(), tuple(p.shape[:2]), tuple(r.shape[:2])))
        return embeddings

    def set_embedding(
        self, features: torch.Tensor, original_size: Tuple[int, int], input_size: Optional[Tuple[int, int]] = None
    ) -> None:
        """Use a precomputed 1 x 256 x 64 x 64 embedding of an image of `original_size`."""
        self.features = features.to(self.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = input_size or preprocess_shape(*self.original_size, self.model.img_size)

    def predict(
        self,
        point_coords: Optional[ArrayLike] = None,
        point_labels: Optional[ArrayLike] = None,
        box: Optional[ArrayLike] = None,
        mask_input: Optional[ArrayLike] = None,
        multimask_output: bool = True,
        attention_similarity: Optional[ArrayLike] = None,
        target_embedding: Optional[ArrayLike] = None,
        full_size: bool = True,
        best_only: bool = False,
    ) -> Prediction:
        """Decode prompts given in original-image pixels; returns numpy arrays.

        point_coords: N x 2 (x, y), point_labels: N (1 foreground, 0 background);
        box: 4 (x0, y0, x1, y1); mask_input: 1 x 256 x 256 low-res logits.
        Batched prompt sets: B x N x 2 / B x N points, B x 4 boxes, B x 1 x 256 x 256
        masks; the output then has a leading B axis. attention_similarity and
        target_embedding are PerSAM's decoder hooks (see sam/transformer.py).
        full_size=False skips the original-size outputs (masks and logits are None).
        best_only=True keeps only the mask with the highest predicted IoU (M = 1; the first
        of equal scores, as numpy's argmax picks), the others are never upscaled.
        """
        batched = (point_coords is not None and np.ndim(point_coords) == 3) or (
            box is not None and np.ndim(box) == 2
        ) or (mask_input is not None and np.ndim(mask_input) == 4)

        def to_batch(x: Optional[ArrayLike], dims: int) -> Optional[torch.Tensor]:
            if x is None:
                return None
            t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, device=self.device)
            return t if batched or t.dim() == dims else t[None]

        result = self.predict_torch(
            to_batch(point_coords, 3),
            to_batch(point_labels, 2),
            to_batch(box, 2),
            to_batch(mask_input, 4),
            multimask_output,
            attention_similarity=None if attention_similarity is None else torch.as_tensor(attention_similarity),
            target_embedding=None if target_embedding is None else torch.as_tensor(target_embedding),
            full_size=full_size,
            best_only=best_only,
        )

        def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
            if t is None:
                return None
            array = t.cpu().numpy() if t.dtype == torch.bool else t.float().cpu().numpy()
            return array if batched else array[0]

        return Prediction(*(to_numpy(t) for t in (result.masks, result.iou_scores, result.low_res_logits, result.logits)))

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
        full_size: bool = True,
        best_only: bool = False,
    ) -> Prediction:
        """Batched decoding, prompts in original-image pixels, tensors in and out.

        point_coords: B x N x 2, point_labels: B x N, boxes: B x 4,
        mask_input: B x 1 x 256 x 256. Returns B x M tensors (see Prediction).
        """
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() before predict()")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = None
        if point_coords is not None:
            if point_coords.shape[:2] != point_labels.shape[:2] or point_coords.shape[-1] != 2:
                raise ValueError(
                    f"points must be B x N x 2 with labels B x N, got {tuple(point_coords.shape)} "
                    f"and {tuple(point_labels.shape)}"
                )
            coords = scale_coords(point_coords.to(self.device), self.original_size, self.model.img_size)
            points = (coords, point_labels.to(self.device, torch.int64))
        if boxes is not None:
            if boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be B x 4 (x0, y0, x1, y1), got {tuple(boxes.shape)}")
            boxes = scale_boxes(boxes.to(self.device).reshape(-1, 4), self.original_size, self.model.img_size)
        mask_input, attention_similarity, target_embedding = (
            self._float_on_device(x) for x in (mask_input, attention_similarity, target_embedding))

        low_res, iou_scores = self._decode(self.decoder_features(), points, boxes, mask_input, multimask_output,
                                           attention_similarity, target_embedding, best_only)
        if not full_size:
            return Prediction(None, iou_scores, low_res, None)
        logits = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        return Prediction(logits > self.model.mask_threshold, iou_scores, low_res, logits)

    @torch.inference_mode()
    def predict_each(
        self,
        images: Sequence[ImageEmbedding],
        point_coords: ArrayLike,
        point_labels: ArrayLike,
        boxes: Optional[ArrayLike] = None,
        mask_input: Optional[ArrayLike] = None,
        multimask_output: bool = True,
        attention_similarity: Optional[ArrayLike] = None,
        target_embedding: Optional[ArrayLike] = None,
        best_only: bool = False,
    ) -> Prediction:
        """Decode prompt set i against encoded image i, for B images in one decoder call.

        point_coords: B x N x 2 (x, y in each image's own original pixels), point_labels: B x N;
        boxes: B x 4; mask_input: B x 1 x 256 x 256; attention_similarity: B x hw;
        target_embedding: 1 x C or B x C. The current image is not changed. Returns numpy
        low-resolution outputs only (the images' sizes differ; `upscale_image` brings one to
        its size): low_res_logits B x M x 256 x 256 and iou_scores B x M, masks and logits None.
        Image i's values are those `predict(..., full_size=False)` gives with image i set.
        """
        count = len(images)
        coords = torch.as_tensor(np.asarray(point_coords, dtype=np.float32), device=self.device)
        labels = torch.as_tensor(np.asarray(point_labels), device=self.device)
        if count < 1 or coords.dim() != 3 or coords.shape[0] != count or coords.shape[-1] != 2 \
                or tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(f"predict_each needs B x N x 2 points and B x N labels for B = {count} images, got "
                             f"{tuple(coords.shape)} and {tuple(labels.shape)}")
        scaled = [scale_coords(coords[i:i + 1], image.original_size, self.model.img_size) for i, image in enumerate(images)]
        points = (torch.cat(scaled), labels.to(torch.int64))
        if boxes is not None:
            given = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device).reshape(-1, 4)
            if given.shape[0] != count:
                raise ValueError(f"predict_each needs B x 4 boxes for B = {count} images, got {tuple(given.shape)}")
            boxes = torch.cat([scale_boxes(given[i:i + 1], image.original_size, self.model.img_size)
                               for i, image in enumerate(images)])
        mask_input, attention_similarity, target_embedding = (
            self._float_on_device(x) for x in (mask_input, attention_similarity, target_embedding))
        low_res, iou_scores = self._decode(self._stacked_features(images), points, boxes, mask_input, multimask_output,
                                           attention_similarity, target_embedding, best_only)
        return Prediction(None, iou_scores.float().cpu().numpy(), low_res.float().cpu().numpy(), None)

    def _float_on_device(self, x: Optional[ArrayLike]) -> Optional[torch.Tensor]:
        """An optional array or tensor as float32 on the model's device (the decoder's extra inputs)."""
        if x is None:
            return None
        return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).to(self.device, torch.float32)

    def _decode(self, features, points, boxes, mask_input, multimask_output, attention_similarity, target_embedding,
                best_only) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the input frame -> (low-res logits B x M x 256 x 256, iou B x M) against
        `features` (1 or B images, channels last)."""
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            image_pe_tokens=self.model.prompt_encoder.get_dense_pe_tokens(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            best_only=best_only,
        )

    def _stacked_features(self, images: Sequence[ImageEmbedding]) -> torch.Tensor:
        """The images' features as one B x 256 x 64 x 64 channels-last batch (the decoder's layout:
        the image tokens hw x C contiguous), made once for the decoder calls of the same images
        (PerSAM makes three in a row), whether they come through `predict` or `predict_each`."""
        tensors = [image.features for image in images]
        cached = self._stacked_cache
        if cached is None or len(cached[0]) != len(tensors) or any(a is not b for a, b in zip(cached[0], tensors)):
            joined = tensors[0].to(self.device) if len(tensors) == 1 else torch.cat([t.to(self.device) for t in tensors])
            stacked = joined.contiguous(memory_format=torch.channels_last)
            cached = (tensors, stacked)
            self._stacked_cache = cached
        return cached[1]

    def upscale_image(self, image: ImageEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Any B x M x 256 x 256 map of an encoded image -> B x M x H x W at that image's size."""
        return self.model.postprocess_masks(low_res.to(self.device), image.input_size, image.original_size)

    def current_image(self) -> ImageEmbedding:
        """The current image as an ImageEmbedding (for `predict_each`)."""
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() before predict()")
        return ImageEmbedding(self.features, self.original_size, self.input_size)

    def decoder_features(self) -> torch.Tensor:
        """`features` in the decoder's layout, channels last (the image tokens hw x C contiguous),
        made once per image: the decoder would otherwise transpose them at every call."""
        return self._stacked_features([self.current_image()])

    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """Any B x M x 256 x 256 map of the current image -> B x M x H x W (as mask logits are)."""
        return self.upscale_image(self.current_image(), low_res)


def _as_rgb_array(image: ArrayLike) -> np.ndarray:
    """Check an H x W x 3 uint8 RGB image (numpy or tensor, any device) and return it as numpy."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected an RGB image of shape H x W x 3, got {tuple(image.shape)}; "
            "convert grayscale or RGBA images first (persam.data.io.load_image does)"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0..255), got dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"the image is empty: shape {tuple(image.shape)}")
    return image
