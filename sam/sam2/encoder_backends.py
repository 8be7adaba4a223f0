"""SAM 2.1's per-frame image step on the same encoder backends as SAM's image encoder (:mod:`sam.backends`):
OpenVINO and ONNX Runtime on the CPU, beside torch.

The step is what :meth:`sam.sam2.model.Sam2Model.forward_image` computes: the Hiera trunk, the FPN neck and
the decoder's two high-resolution projections.  It is exported once per model, input side and precision and
cached like SAM's encoders (:func:`sam.export.ensure_export`, keyed by the checkpoint's sha256), so a run
after the first loads it in about a second instead of converting it again.  The exported graph has one
output, the three levels flattened and concatenated, because the runners of :mod:`sam.backends` return one
tensor; it is split back here.  The levels' position encodings depend only on their sizes, so they are
computed once in torch and shared by every frame.  OpenVINO runs with the fp32 inference hint unless bf16 is
asked for (on CPUs with native bf16 its default would be bf16, which moves the features by about 1e-2).

The memory attention, the memory encoder and the decoder stay in torch.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..backends import load_export, resolve_backend
from ..export import Log, _stderr, weights_sha256
from .build import guess_sam2_variant
from .model import Sam2Model

__all__ = ["ImageStepGraph", "Sam2ImageStep", "use_backend"]

EXPORTED_BACKENDS = ("openvino", "onnxruntime")


class ImageStepGraph(nn.Module):
    """forward_image as the exporters take it: (B, 3, S, S) -> (B, N), the three FPN levels (B, C_i, H_i, W_i)
    flattened and concatenated, finest first."""

    def __init__(self, model: Sam2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.model.forward_image(images)["backbone_fpn"]
        return torch.cat([level.flatten(1) for level in levels], dim=1)


def level_shapes(model: Sam2Model) -> List[Tuple[int, int, int]]:
    """(C, H, W) of forward_image's three levels: the projected strides 4 and 8, and the embedding."""
    side = int(model.image_size)
    decoder = model.sam_mask_decoder
    return [(decoder.conv_s0.out_channels, side // 4, side // 4),
            (decoder.conv_s1.out_channels, side // 8, side // 8),
            (model.hidden_dim, side // 16, side // 16)]


class Sam2ImageStep:
    """A drop-in for ``model.forward_image`` on ``backend`` ("openvino" or "onnxruntime"), CPU images
    (B, 3, S, S) float32.  ``sha256`` names the weights in the cache (the checkpoint file's; None: the weights'
    own); ``build_seconds`` is the time spent exporting here (0 when the export was cached).  Raises
    :class:`sam.backends.BackendUnavailable` when ``backend`` is not installed, the model is not on the CPU, or
    the backend does not run ``precision``."""

    def __init__(
        self,
        model: Sam2Model,
        backend: str,
        precision: str = "fp32",
        *,
        sha256: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        log: Optional[Log] = _stderr,
        threads: Optional[int] = None,
    ) -> None:
        device = next(model.parameters()).device
        self.name = resolve_backend(backend, device, precision)  # installed, on the CPU, a precision it runs
        if self.name not in EXPORTED_BACKENDS:
            raise ValueError(f"SAM 2.1's image step runs exported on one of {EXPORTED_BACKENDS}, not {backend!r}")
        self.precision = precision
        self.shapes = level_shapes(model)
        side = int(model.image_size)
        self.input_shape = (3, side, side)
        position_encoding = model.image_encoder.neck.position_encoding
        with torch.no_grad():
            self.positions = [position_encoding(torch.zeros(1, model.hidden_dim, h, w)) for _, h, w in self.shapes]
        kind = f"{guess_sam2_variant(model.state_dict()) or 'sam2'}-image-step"
        self.runner = load_export(self.name, ImageStepGraph(model).eval(), kind=kind,
                                  sha256=sha256 or weights_sha256(model), precision=precision, img_size=side,
                                  cache_dir=cache_dir, log=log, threads=threads, openvino_route="torch")
        self.build_seconds = self.runner.build_seconds
        self.cache_path = self.runner.cache_path

    def __call__(self, images: torch.Tensor) -> Dict[str, object]:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape or images.device.type != "cpu":
            raise ValueError(f"the {self.name} image step takes CPU images (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(images.shape)} on {images.device}")
        flat = self.runner(images)
        batch = int(images.shape[0])
        sizes = [c * h * w for c, h, w in self.shapes]
        levels = [part.reshape(batch, *shape) for part, shape in zip(flat.split(sizes, dim=1), self.shapes)]
        positions = [p.expand(batch, -1, -1, -1) for p in self.positions]
        return {"vision_features": levels[-1], "vision_pos_enc": positions, "backbone_fpn": levels}


def use_backend(model: Sam2Model, backend: str, precision: str = "fp32", **runner_options) -> Sam2Model:
    """`model` (on the CPU) with its forward_image run by ``backend`` (see :class:`Sam2ImageStep`); returns it."""
    step = Sam2ImageStep(model, backend, precision, **runner_options)
    object.__setattr__(model, "forward_image", step)
    return model
