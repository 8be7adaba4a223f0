"""DINOv2 patch features through the same encoder backends as SAM's image encoder
(:mod:`sam.backends`: torch, OpenVINO, ONNX Runtime).

DINOv2's input follows the photo's aspect, so its size varies from photo to photo.  The exports are
made per input size (H x W, multiples of 14), with a dynamic batch: each export holds the position
embedding already resized to its grid as a constant, so that it computes exactly what the torch
model computes (Meta's bicubic resize with its +0.1 scale factor, which an ONNX Resize with a
dynamic size would not reproduce).  They are cached like SAM's, under
``<cache>/compiled/dinov2_<variant>-<sha256[:16]>-<precision>-<H>x<W>-<backend>-v<N>/``; a runner
keeps the last few sizes it met loaded.  A photo set resized to a fixed long side meets few sizes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .backends import load_export
from .dinov2 import DINOv2, dinov2_variant_of
from .export import Log, _stderr, weights_sha256


class PatchFeaturesAtSize(nn.Module):
    """DINOv2's patch features for one input size, the export's graph:
    B x 3 x H x W -> B x C x H/14 x W/14 (the last block's output before the final norm)."""

    def __init__(self, model: DINOv2, height: int, width: int) -> None:
        super().__init__()
        self.model = model
        self.img_size = (height, width)
        self.rows, self.cols = model.grid_size(torch.empty(1, 3, height, width, device="meta"))
        with torch.no_grad():
            table = model.pos_embed_for_grid(self.rows, self.cols).detach().clone()
        self.register_buffer("pos_embed_table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.run_blocks(x, self.pos_embed_table)[:, 1:]
        return tokens.transpose(1, 2).reshape(-1, self.model.embed_dim, self.rows, self.cols)


def dinov2_kind(model: DINOv2) -> str:
    """'dinov2_vits14' ... 'dinov2_vitg14', or the width x depth of another shape: the export's kind."""
    variant = dinov2_variant_of(model.state_dict())
    return f"dinov2_{variant}" if variant else f"dinov2-{model.embed_dim}x{len(model.blocks)}"


class Dinov2Features:
    """Runs ``DINOv2.patch_features`` on one backend: B x 3 x H x W -> B x C x H/14 x W/14 float32.

    ``backend`` is a resolved one (:func:`sam.backends.resolve_backend`).  On torch the model runs
    eagerly, with autocast for bf16 / fp16; on OpenVINO and ONNX Runtime each input size is
    exported once (cached by the weights' sha256) and the latest ``keep_sizes`` sizes stay loaded.
    ``build_seconds`` adds up the exports built by this runner.
    """

    def __init__(
        self,
        model: DINOv2,
        backend: str,
        precision: str = "fp32",
        *,
        sha256: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        log: Optional[Log] = _stderr,
        threads: Optional[int] = None,
        keep_sizes: int = 4,
    ) -> None:
        self.model = model.eval()
        self.name = backend
        self.precision = precision
        self.cache_path: Optional[Path] = None
        self.build_seconds = 0.0
        self._sha256 = sha256
        self._cache_dir = cache_dir
        self._log = log
        self._threads = threads
        self._keep = max(1, keep_sizes)
        self._runners: "OrderedDict[Tuple[int, int], object]" = OrderedDict()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "torch":
            from .precision import autocast_context

            with torch.inference_mode(), autocast_context(x.device, self.precision):
                return self.model.patch_features(x).float()
        self.model.grid_size(x)  # the same one-line error as torch for a bad shape
        return self._runner((int(x.shape[-2]), int(x.shape[-1])))(x)

    def _runner(self, size: Tuple[int, int]):
        if size in self._runners:
            self._runners.move_to_end(size)
            return self._runners[size]
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.model)
        runner = load_export(self.name, PatchFeaturesAtSize(self.model, *size), kind=dinov2_kind(self.model),
                             sha256=self._sha256, precision=self.precision, img_size=size,
                             cache_dir=self._cache_dir, log=self._log, threads=self._threads)
        self.build_seconds += runner.build_seconds
        self.cache_path = runner.cache_path
        self._runners[size] = runner
        while len(self._runners) > self._keep:
            self._runners.popitem(last=False)
        return runner


def make_dinov2_encoder(
    model: DINOv2,
    backend: str,
    precision: str = "fp32",
    *,
    sha256: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Log] = _stderr,
    threads: Optional[int] = None,
) -> Dinov2Features:
    """The runner of ``model.patch_features`` for a resolved ``backend`` (see
    :func:`sam.backends.resolve_backend`); ``sha256`` is the checkpoint file's (None: the weights' own)."""
    return Dinov2Features(model, backend, precision, sha256=sha256, cache_dir=cache_dir, log=log, threads=threads)
