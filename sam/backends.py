"""Who runs the image encoder, the predictor's one expensive step.

    torch        eager PyTorch: always installed, any device; bf16 / fp16 by autocast
    openvino     OpenVINO on the CPU (``pip install -e ".[openvino]"``): our own encoder
                 module exported once (torch.export -> OpenVINO IR) and cached
    onnxruntime  ONNX Runtime on the CPU (``pip install -e ".[onnx]"``): our encoder exported
                 once to ONNX and cached; fp32 only

``"auto"`` (the default) takes the fastest one installed for the model's device: on a CPU
openvino, then onnxruntime (fp32 only), else torch; on a GPU torch. ``$PERSAM_BACKEND``
overrides what ``"auto"`` picks (the test suite sets it to ``torch``). An explicitly asked
backend that is not installed, or that cannot run on the device, is an error that says so.

Only the image encoder changes hands: the prompt encoder and the mask decoder (with PerSAM's
hooks) stay in torch, fp32. Every backend maps the normalised, padded B x 3 x S x S input to
the B x 256 x S/16 x S/16 embedding; in fp32 the exports agree with torch to about 1e-5.

The exported model is built once per weights, precision and input side and kept under
``<cache>/compiled/<model_type>-<sha256[:16]>-<precision>-<img_size>-<backend>-v<N>/``
(``<cache>`` is ``$PERSAM_CACHE`` or ``~/.cache/persam``; ``sha256`` is the checkpoint's, or
of the encoder's weights when there is no file). The folder is written under a temporary name
and renamed into place, so a reader never sees half of it; ``meta.json`` records the size and
sha256 of every file, and a folder that fails that check (or fails to load) is built again.
Building says so before it starts, with its expected one-time cost, and after it the time it
took (to the ``log`` callback: stderr by default).

A CPU run that "auto" leaves on torch because no compiled backend is installed is told how to
get one by :func:`faster_backend_hint` (the ``persam`` commands print it once per run).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import torch
from torch import nn

BACKENDS = ("torch", "openvino", "onnxruntime")
BACKEND_CHOICES = ("auto",) + BACKENDS
# The pip extra that installs each optional backend (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx"}
MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
# Bump when the exported graph changes (the export code, not the weights): old caches are then ignored.
EXPORT_VERSION = 3
META_FILE = "meta.json"
META_FORMAT = "persam-compiled-encoder"
# Most elements of the decomposed relative-position bias that the exported ViT attention builds at
# once, per image (1 GiB in fp32): a larger global attention runs in query blocks of this size.
# SAM's own models stay whole at 1024 (ViT-B 12 x 4096^2, ViT-L/H 16 x 4096^2 = 2^28): blocks of
# 2^24 cost ViT-B 10% of its OpenVINO time (5.98 s against 5.41 s on a 2-core EPYC).
EXPORT_BIAS_ELEMENTS = 1 << 28
# What building an export costs once, by model kind, for the line printed before it starts: the
# README's measurements on a 2-core CPU (vit_t 5 to 45 s, vit_b about 20 s), and an allowance for
# the larger ViTs, which export the same way with more blocks.
EXPECTED_BUILD = {"vit_t": "up to a minute", "vit_b": "up to a minute", "vit_l": "a few minutes",
                  "vit_h": "a few minutes"}

Log = Callable[[str], None]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend is not installed or cannot run here."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_installed(backend: str) -> bool:
    """Whether `backend`'s runtime can be imported (torch always can)."""
    if backend == "torch":
        return True
    try:
        return importlib.util.find_spec(MODULES[backend]) is not None
    except (ImportError, ValueError):
        return False


def installed_backends() -> tuple:
    return tuple(b for b in BACKENDS if is_installed(b))


def faster_backend_hint(backend: Optional[str], device: Union[str, torch.device], precision: str = "fp32") -> Optional[str]:
    """One line for a run whose image encoder "auto" leaves on torch on a CPU because no faster backend
    is installed; None otherwise: on a GPU, when a compiled backend is picked, or when torch was asked
    for (by name, or by $PERSAM_BACKEND)."""
    if (backend or "auto") != "auto" or os.environ.get("PERSAM_BACKEND", "").strip() not in ("", "auto"):
        return None
    if torch.device(device).type != "cpu" or resolve_backend("auto", device, precision) != "torch":
        return None
    return (f"the image encoder runs on torch; pip install -e \".[{EXTRAS['openvino']}]\" makes it about 2x "
            f"faster on this CPU (see README, Speed)")


def resolve_backend(backend: Optional[str], device: Union[str, torch.device], precision: str = "fp32") -> str:
    """The concrete backend for a request ("auto" or a name) on `device` in `precision`."""
    device = torch.device(device)
    requested = backend or "auto"
    if requested == "auto":
        requested = os.environ.get("PERSAM_BACKEND", "").strip() or "auto"
        if requested not in BACKEND_CHOICES:
            raise ValueError(f"$PERSAM_BACKEND is {requested!r}; use one of {', '.join(BACKEND_CHOICES)}")
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, not {requested!r}")
    if requested == "auto":
        if device.type == "cpu":
            if is_installed("openvino"):
                return "openvino"
            if precision == "fp32" and is_installed("onnxruntime"):
                return "onnxruntime"
        return "torch"
    if requested == "torch":
        return requested
    if device.type != "cpu":
        raise BackendUnavailable(
            f"backend {requested!r} runs the image encoder on the CPU, but the model is on {device}; "
            f"use backend 'torch' (--backend torch) on {device.type}"
        )
    if requested == "onnxruntime" and precision != "fp32":
        raise BackendUnavailable(f"backend 'onnxruntime' runs fp32 only, not {precision}; use 'openvino' or 'torch'")
    if not is_installed(requested):
        raise BackendUnavailable(
            f"backend {requested!r} is not installed: pip install -e \".[{EXTRAS[requested]}]\" "
            f"(or pip install 'persam[{EXTRAS[requested]}]'), or choose --backend torch"
        )
    return requested


# --------------------------------------------------------------------------------------------
# Runners: B x 3 x S x S normalised input -> B x C x S/16 x S/16 float32 embedding


class TorchEncoder:
    """Eager PyTorch, with autocast for the reduced-precision modes."""

    name = "torch"

    def __init__(self, encoder: nn.Module, precision: str) -> None:
        self.encoder = encoder
        self.precision = precision
        self.build_seconds = 0.0
        self.cache_path: Optional[Path] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .predictor import autocast_context

        with torch.inference_mode(), autocast_context(x.device, self.precision):
            return self.encoder(x).float()


class OpenVINOEncoder:
    """The exported encoder compiled by OpenVINO for the CPU (latency hint, one stream).

    The IR has a dynamic batch; it is compiled for each batch size met (static shapes run a little
    faster), keeping the single-image model and the latest other one.
    """

    name = "openvino"

    def __init__(self, xml: Path, precision: str, threads: Optional[int] = None) -> None:
        import openvino as ov

        self.precision = precision
        self.cache_path = xml.parent
        self.build_seconds = 0.0
        self._xml = xml
        self._core = ov.Core()
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            # Say it: on CPUs with native bf16 OpenVINO's default is bf16, not fp32.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        }
        self._compiled: Dict[int, tuple] = {}
        self._request(1)  # compile now: a broken file fails here, not at the first image

    def _request(self, batch: int):
        if batch not in self._compiled:
            import openvino as ov

            model = self._core.read_model(str(self._xml))
            shape = model.inputs[0].get_partial_shape()
            model.reshape({model.inputs[0]: ov.PartialShape([batch, 3, shape[2], shape[3]])})
            try:
                compiled = self._core.compile_model(model, "CPU", self._config)
            except RuntimeError:
                if self._config["INFERENCE_PRECISION_HINT"] == "f32":
                    raise
                warnings.warn("OpenVINO cannot run bf16 on this CPU; the encoder runs in f32", RuntimeWarning)
                self._config["INFERENCE_PRECISION_HINT"] = "f32"
                compiled = self._core.compile_model(model, "CPU", self._config)
            for other in [b for b in self._compiled if b != 1]:
                del self._compiled[other]
            self._compiled[batch] = (compiled.create_infer_request(), compiled.output(0), compiled)
        return self._compiled[batch]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().to("cpu", torch.float32).contiguous().numpy()
        request, output, _ = self._request(int(pixels.shape[0]))
        result = request.infer({0: pixels}, share_inputs=True)
        return torch.from_numpy(result[output].copy())


class OnnxRuntimeEncoder:
    """The encoder exported to ONNX, run by ONNX Runtime's CPU provider with all graph optimisations."""

    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        self.precision = precision
        self.cache_path = path.parent
        self.build_seconds = 0.0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self._input: pixels})[0])


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


def cache_key(kind: str, sha256: str, precision: str, img_size: int, backend: str) -> str:
    return f"{kind}-{sha256[:16]}-{precision}-{img_size}-{backend}-v{EXPORT_VERSION}"


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


def _example_input(img_size: int, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, 3, img_size, img_size)


def export_openvino(encoder: nn.Module, img_size: int, xml: Path, route: str = "onnx") -> None:
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
        model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, img_size, img_size])})
        ov.save_model(model, str(xml), compress_to_fp16=False)  # the default would halve the weights
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _torch_export(encoder: nn.Module, img_size: int):
    """torch.export of `encoder` with a dynamic batch (static batch 1 if that fails)."""
    with warnings.catch_warnings(), torch.no_grad(), export_friendly(encoder):
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=1024)
            return torch.export.export(encoder, (_example_input(img_size),), dynamic_shapes=({0: batch},))
        except Exception:  # noqa: BLE001 - any tracing failure: a fixed batch still works
            return torch.export.export(encoder, (_example_input(img_size, 1),))


def export_onnx(encoder: nn.Module, img_size: int, path: Path) -> None:
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
    img_size: int,
    cache_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Log] = _stderr,
) -> tuple:
    """The cached export of `encoder` for `backend` (built now if missing or damaged).

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


def make_encoder(
    model: nn.Module,
    backend: str,
    precision: str,
    *,
    sha256: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Log] = _stderr,
    threads: Optional[int] = None,
):
    """The runner of `model.image_encoder` for a resolved `backend` (see resolve_backend).

    `sha256` identifies the weights (the checkpoint file's sha256); None hashes the encoder's
    weights instead.
    """
    encoder = model.image_encoder
    if backend == "torch":
        return TorchEncoder(encoder, precision)
    kind = encoder_kind(encoder)
    sha = sha256 or weights_sha256(encoder)
    img_size = int(encoder.img_size)
    path, seconds = ensure_export(backend, encoder, kind=kind, sha256=sha, precision=precision,
                                  img_size=img_size, cache_dir=cache_dir, log=log)
    try:
        runner = _load(backend, path, precision, threads)
    except Exception as exc:  # noqa: BLE001 - a file that passed the check but does not load: build again
        if log is not None:
            log(f"persam: the cached {backend} encoder in {path.parent} does not load ({exc}); building it again")
        shutil.rmtree(path.parent, ignore_errors=True)
        path, seconds = ensure_export(backend, encoder, kind=kind, sha256=sha, precision=precision,
                                      img_size=img_size, cache_dir=cache_dir, log=log)
        runner = _load(backend, path, precision, threads)
    runner.build_seconds = seconds
    return runner


def _load(backend: str, path: Path, precision: str, threads: Optional[int]):
    if backend == "openvino":
        return OpenVINOEncoder(path, precision, threads)
    return OnnxRuntimeEncoder(path, precision, threads)


def describe(runner) -> Dict[str, object]:
    """What a runner is, for logs and results: backend, precision, cache folder, one-time build seconds."""
    return {
        "backend": runner.name,
        "precision": runner.precision,
        "cache": str(runner.cache_path) if runner.cache_path else None,
        "build_seconds": round(float(runner.build_seconds), 2),
    }
