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
get one by :func:`faster_backend_hint` (the ``persam`` commands print it once per run).  The
exports and their cache are :mod:`sam.export`'s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from .export import Log, _stderr, encoder_kind, ensure_export, weights_sha256

BACKENDS = ("torch", "openvino", "onnxruntime")
BACKEND_CHOICES = ("auto",) + BACKENDS
# The pip extra that installs each optional backend (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx"}
MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend is not installed or cannot run here."""


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
            f"use backend 'torch' on {device.type}"
        )
    if requested == "onnxruntime" and precision != "fp32":
        raise BackendUnavailable(f"backend 'onnxruntime' runs fp32 only, not {precision}; use 'openvino' or 'torch'")
    if not is_installed(requested):
        raise BackendUnavailable(
            f"backend {requested!r} is not installed: pip install -e \".[{EXTRAS[requested]}]\" "
            f"(or pip install 'persam[{EXTRAS[requested]}]'), or choose backend 'torch'"
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
        from .precision import autocast_context

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
    return load_export(backend, encoder, kind=encoder_kind(encoder), sha256=sha256 or weights_sha256(encoder),
                       precision=precision, img_size=int(encoder.img_size), cache_dir=cache_dir, log=log,
                       threads=threads)


def load_export(
    backend: str,
    graph: nn.Module,
    *,
    kind: str,
    sha256: str,
    precision: str,
    img_size,
    cache_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Log] = _stderr,
    threads: Optional[int] = None,
    openvino_route: str = "onnx",
):
    """The OpenVINO or ONNX Runtime runner of `graph`'s cached export (:func:`sam.export.ensure_export`,
    built now if missing).  A cached file that passed the export's check but does not load is built again.
    The runner's ``build_seconds`` is the time spent exporting here (0.0 when the export was cached)."""
    export_options = dict(kind=kind, sha256=sha256, precision=precision, img_size=img_size, cache_dir=cache_dir,
                          log=log, openvino_route=openvino_route)
    path, seconds = ensure_export(backend, graph, **export_options)
    try:
        runner = _load(backend, path, precision, threads)
    except Exception as exc:  # noqa: BLE001 - a file that passed the check but does not load: build again
        if log is not None:
            log(f"persam: the cached {backend} encoder in {path.parent} does not load ({exc}); building it again")
        shutil.rmtree(path.parent, ignore_errors=True)
        path, rebuild_seconds = ensure_export(backend, graph, **export_options)
        seconds += rebuild_seconds
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
