"""SAM 2.1's per-frame image step on OpenVINO (CPU): the Hiera trunk, the FPN neck and the decoder's two
high-resolution projections, i.e. what :meth:`sam.sam2.model.Sam2Model.forward_image` computes.

The step is converted from our own modules (``openvino.convert_model`` on a traced example at the model's
input side, batch 1) when the tracker is built, and compiled with the fp32 inference hint: on CPUs with
native bf16, OpenVINO's default would run in bf16 and move the features by about 1e-2 (with the hint they
agree with torch to about 1e-5 relative).  Nothing is cached on disk yet: conversion costs seconds per run.

Opt-in (``use_openvino(model)``); the memory attention, memory encoder and decoder stay in torch.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from sam.sam2.model import Sam2Model

__all__ = ["OpenVINOForwardImage", "OpenVINOUnavailable", "use_openvino"]


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO is not installed (``pip install openvino``)."""


class _ForwardImage(nn.Module):
    """forward_image as a module with tensor outputs: (fpn_0, fpn_1, fpn_2, pos_0, pos_1, pos_2)."""

    def __init__(self, model: Sam2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        out = self.model.forward_image(images)
        return (*out["backbone_fpn"], *out["vision_pos_enc"])


class OpenVINOForwardImage:
    """A drop-in for ``model.forward_image`` on one (1, 3, S, S) float32 image at a time."""

    def __init__(self, model: Sam2Model, threads: Optional[int] = None) -> None:
        if importlib.util.find_spec("openvino") is None:
            raise OpenVINOUnavailable("OpenVINO is not installed: pip install openvino")
        import openvino as ov

        side = int(model.image_size)
        self.shape = (1, 3, side, side)
        example = torch.zeros(self.shape, dtype=torch.float32)
        with torch.no_grad(), warnings.catch_warnings():
            # the trace fixes the shape-dependent branches (window padding) for this one input side: as meant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
            converted = ov.convert_model(_ForwardImage(model).eval(), example_input=example)
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(converted, "CPU", config)
        self.outputs = list(self.compiled.outputs)

    def __call__(self, images: torch.Tensor) -> Dict[str, object]:
        if tuple(images.shape) != self.shape or images.device.type != "cpu":
            raise ValueError(f"the OpenVINO image step takes one CPU image {self.shape}, got {tuple(images.shape)} "
                             f"on {images.device}")
        result = self.compiled(np.ascontiguousarray(images.detach().numpy(), dtype=np.float32))
        tensors = [torch.from_numpy(np.array(result[output])) for output in self.outputs]
        levels = len(tensors) // 2
        fpn, positions = tensors[:levels], tensors[levels:]
        return {"vision_features": fpn[-1], "vision_pos_enc": positions, "backbone_fpn": fpn}


def use_openvino(model: Sam2Model, threads: Optional[int] = None) -> Sam2Model:
    """`model` (on the CPU) with its forward_image run by OpenVINO; returns it."""
    step = OpenVINOForwardImage(model, threads)
    object.__setattr__(model, "forward_image", step)
    return model
