"""Building the image encoder's exports for the compiled backends, and their cache (see
:mod:`sam.backends` for the backends and where the cache lives).

The identity of an export: the encoder's kind (:func:`encoder_kind`), its weights
(:func:`weights_sha256`, or the checkpoint's sha256), precision, input side and backend
(:func:`cache_key`).  :data:`EXPORTERS` write an encoder as OpenVINO IR or ONNX;
:func:`ensure_export` returns the cached export, built (once, under a temporary name, then renamed
into place) when missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

# Bump when the exported graph changes (the export code, not the weights): old caches are then ignored.
EXPORT_VERSION = 3
META_FILE = "meta.json"
META_FORMAT = "persam-compiled-encoder"
# Most elements of the decomposed relative-position bias that the exported ViT attention builds at
# once, per image (1 GiB in fp32): a larger global attention runs in query blocks of this size.
# SAM's own models stay whole at 1024 (ViT-B 12 x 4096^2, ViT-L/H 16 x 4096^2 = 2^28): smaller
# blocks cost ViT-B a tenth of its OpenVINO time (docs/performance.md).
EXPORT_BIAS_ELEMENTS = 1 << 28
# What building an export costs once, by model kind, for the line printed before it starts: what
# vit_t and vit_b were measured to take (docs/performance.md), and an allowance for the larger
# ViTs, which export the same way with more blocks.
EXPECTED_BUILD = {"vit_t": "up to a minute", "vit_b": "up to a minute", "vit_l": "a few minutes",
                  "vit_h": "a few minutes", "dinov2_vits14": "up to a minute", "dinov2_vitb14": "up to a minute",
                  "dinov2_vitl14": "a few minutes", "dinov2_vitg14": "several minutes"}

Log = Callable[[str], None]
# An export's input size: S for SAM's S x S square, (H, W) for DINOv2, whose input follows the photo's aspect.
InputSize = Union[int, Tuple[int, int]]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Identity of the encoder: its kind, its weights


def encoder_kind(encoder: nn.Module) -> str:
    """'vit_t', 'vit_b', 'vit_l', 'vit_h', or a description of another ViT's shape."""
    from .build import VIT_CONFIGS
    from .image_encoder import ImageEncoderViT
    from .tiny_vit import TinyViT

    if isinstance(encoder, TinyViT):
        return "vit_t"
    if isinstance(encoder, ImageEncoderViT):
        dim, depth = encoder.patch_embed.proj.out_channels, len(encoder.blocks)
        for name, config in VIT_CONFIGS.items():
            if (config.embed_dim, config.depth) == (dim, depth):
                return name
        return f"vit-{dim}x{depth}"
    return type(encoder).__name__.lower()


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): its weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compiled_dir(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Where exported encoders are kept: <cache>/compiled."""
    from .download import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "compiled"


def cache_key(kind: str, sha256: str, precision: str, img_size: InputSize, backend: str) -> str:
    size = img_size if isinstance(img_size, int) else "x".join(str(int(n)) for n in img_size)
    return f"{kind}-{sha256[:16]}-{precision}-{size}-{backend}-v{EXPORT_VERSION}"


def _height_width(img_size: InputSize) -> Tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


# --------------------------------------------------------------------------------------------
# Export


@contextmanager
def export_friendly(encoder: nn.Module) -> Iterator[nn.Module]:
    """`encoder` with its attention written for a static graph (same values, no data-dependent loops).

    The ViT's eager attention builds its relative-position bias in blocks sized for the allocator
    and chosen from the batch size at run time; the exported graph builds it in fixed query
    blocks (at most EXPORT_BIAS_ELEMENTS per image) whatever the batch, so the batch can stay
    a dynamic dimension. TinyViT exports as it is.
    """
    from . import image_encoder

    original = image_encoder.attention_with_decomposed_bias
    image_encoder.attention_with_decomposed_bias = _export_attention
    try:
        yield encoder
    finally:
        image_encoder.attention_with_decomposed_bias = original


def _export_attention(q, k, v, rel_h, rel_w, scale):
    from .image_encoder import _biased_attention

    heads, length = q.shape[1], q.shape[2]
    per_query = rel_h.shape[-1] * rel_w.shape[-1]
    step = max(1, EXPORT_BIAS_ELEMENTS // (heads * per_query))
    if step >= length:
        return _biased_attention(q, k, v, rel_h, rel_w, scale)
    blocks = [
        _biased_attention(q[:, :, i:i + step], k, v, rel_h[:, :, i:i + step], rel_w[:, :, i:i + step], scale)
        for i in range(0, length, step)
    ]
    return torch.cat(blocks, dim=2)


def _example_input(img_size: InputSize, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, 3, *_height_width(img_size))


def export_openvino(encoder: nn.Module, img_size: InputSize, xml: Path, route: str = "onnx") -> None:
    """Convert `encoder` (fp32, CPU) to an OpenVINO IR at `xml` (+ .bin), batch dynamic, fp32 weights.

    route "onnx" (default): torch's ONNX exporter, read by OpenVINO's ONNX front end (several
    times quicker to build than "torch", same speed of the result); "torch": torch.export,
    read by OpenVINO's PyTorch front end. "onnx" falls back to "torch" if it fails.
    """
    import openvino as ov

    model = None
    scratch = xml.parent / "onnx-export"
    try:
        if route == "onnx":
            try:
                scratch.mkdir()
                onnx_file = scratch / "encoder.onnx"  # (with any external weight files beside it)
                export_onnx(encoder, img_size, onnx_file)
                model = ov.convert_model(str(onnx_file))
            except Exception:  # noqa: BLE001 - the other front end may still manage
                model = None
        if model is None:
            program = _torch_export(encoder, img_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ov.convert_model(program)
        model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, *_height_width(img_size)])})
        ov.save_model(model, str(xml), compress_to_fp16=False)  # the default would halve the weights
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _torch_export(encoder: nn.Module, img_size: InputSize):
    """torch.export of `encoder` with a dynamic batch (static batch 1 if that fails)."""
    with warnings.catch_warnings(), torch.no_grad(), export_friendly(encoder):
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=1024)
            return torch.export.export(encoder, (_example_input(img_size),), dynamic_shapes=({0: batch},))
        except Exception:  # noqa: BLE001 - any tracing failure: a fixed batch still works
            return torch.export.export(encoder, (_example_input(img_size, 1),))


def export_onnx(encoder: nn.Module, img_size: InputSize, path: Path) -> None:
    """Export `encoder` to ONNX at `path` (opset 17, batch dynamic) with torch's TorchScript exporter."""
    with warnings.catch_warnings(), torch.no_grad(), export_friendly(encoder):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (_example_input(img_size, 1),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
        )


EXPORTERS = {
    "openvino": ("encoder.xml", export_openvino),
    "onnxruntime": ("encoder.onnx", export_onnx),
}


def runtime_version(backend: str) -> str:
    if backend == "openvino":
        import openvino

        return openvino.__version__
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    return torch.__version__


# --------------------------------------------------------------------------------------------
# The cache


def _file_record(path: Path) -> dict:
    from .download import sha256_file

    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _valid_entry(folder: Path, main_file: str) -> bool:
    """Whether `folder` holds a complete export: meta.json readable, every file of the right size and sha256."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != META_FORMAT or meta.get("export_version") != EXPORT_VERSION:
            return False
        files = meta["files"]
        if main_file not in files:
            return False
        for name, record in files.items():
            if _file_record(folder / name) != record:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_export(
    backend: str,
    encoder: nn.Module,
    *,
    kind: str,
    sha256: str,
    precision: str,
    img_size: InputSize,
    cache_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Log] = _stderr,
    openvino_route: str = "onnx",
) -> tuple:
    """The cached export of `encoder` for `backend` (built now if missing or damaged).

    `openvino_route` is :func:`export_openvino`'s route (SAM 2.1's image step takes "torch": OpenVINO
    cannot compile the IR its ONNX front end makes of Hiera).

    Returns (path of the main file, seconds spent building here: 0.0 when it was cached).
    """
    main_file, exporter = EXPORTERS[backend]
    root = compiled_dir(cache_dir)
    folder = root / cache_key(kind, sha256, precision, img_size, backend)
    if _valid_entry(folder, main_file):
        return folder / main_file, 0.0
    if log is not None:
        log(f"persam: building the {backend} image encoder for {kind} ({precision}), once: this takes "
            f"{EXPECTED_BUILD.get(kind, 'a minute or more')} on a 2-core CPU; later runs load it from {root}")
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared like the checkpoints
    try:
        if backend == "openvino" and openvino_route != "onnx":
            export_openvino(_cpu_fp32(encoder), img_size, staging / main_file, route=openvino_route)
        else:
            exporter(_cpu_fp32(encoder), img_size, staging / main_file)
        seconds = time.perf_counter() - start
        files = {p.name: _file_record(p) for p in sorted(staging.iterdir()) if p.is_file()}
        meta = {
            "format": META_FORMAT, "export_version": EXPORT_VERSION, "backend": backend,
            "runtime_version": runtime_version(backend), "torch_version": torch.__version__,
            "model_type": kind, "weights_sha256": sha256, "precision": precision, "img_size": img_size,
            "build_seconds": round(seconds, 2), "files": files,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        _publish(staging, folder, main_file)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not _valid_entry(folder, main_file):  # lost a race to a damaged folder: should not happen
        raise RuntimeError(f"could not build the {backend} encoder in {folder}")
    if log is not None:
        log(f"persam: built the {backend} image encoder for {kind} ({precision}) in {seconds:.1f} s, once; "
            f"cached in {folder}")
    return folder / main_file, seconds


def _cpu_fp32(encoder: nn.Module) -> nn.Module:
    """`encoder` itself when it is fp32 on the CPU, else a fp32 CPU copy (the export needs one)."""
    params = list(encoder.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return encoder.eval()
    import copy

    return copy.deepcopy(encoder).to("cpu", torch.float32).eval()


def _publish(staging: Path, folder: Path, main_file: str) -> None:
    """Move the finished `staging` folder to `folder`, replacing a damaged one; a valid one already there wins."""
    for _ in range(3):
        try:
            os.rename(staging, folder)
            return
        except OSError:
            if not folder.exists():
                raise
        if _valid_entry(folder, main_file):  # another process finished the same export first
            return
        trash = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(folder, trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not move the built encoder into {folder}")
