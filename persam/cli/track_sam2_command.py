"""``persam track --tracker sam2``: its arguments read into the run of persam.runs.track with
persam.runs.track_sam2's frame loop (:func:`sam2_run_inputs`).

Two models: SAM 2.1 (``--model sam2.1_hiera_*``, ``--checkpoint``) follows the objects; SAM (v1) is the
concept's model (``--sam-checkpoint``; the concept file's model, or vit_t to learn a concept from the
reference), which finds the objects where SAM 2 has no mask for them and makes a mask from clicks / a box.
"""

from __future__ import annotations

import sys
from functools import partial

from persam.errors import InputError, SettingError
from persam.runs.track import TrackOptions
from persam.runs.track_reference import Reference

__all__ = ["sam2_run_inputs"]


def _note(line: str) -> None:
    print(f"persam: note: {line}", file=sys.stderr)


def _sam_checkpoint(args, reference: Reference, sam_type: str):
    """SAM (v1)'s checkpoint for the concept, or None where the reference can do without it (a mask on a
    frame: then nothing looks for the object again once SAM 2 loses it, said in one line)."""
    from persam.runs.models import resolve_checkpoint

    needed = reference.kind != "frame" or reference.masks is None
    try:
        return resolve_checkpoint(sam_type, args.sam_checkpoint)
    except SettingError:  # no cached download (a --sam-checkpoint given that is missing is an InputError)
        what = {"concept": "the concept finds the object", "image": "the reference image's concept finds the object"}
        if needed:
            why = what.get(reference.kind, "SAM makes the mask from the clicks / box")
            raise InputError(f"--tracker sam2: {why} with SAM {sam_type}, and it has no checkpoint: run "
                             f"`persam download {sam_type}` or pass --sam-checkpoint PATH") from None
        if args.redetect_after != 0:
            _note(f"no SAM {sam_type} checkpoint (`persam download {sam_type}` or --sam-checkpoint): the object "
                  f"is not looked for again once SAM 2 loses it")
        return None


def sam2_run_inputs(args, reference: Reference):
    """(models factory, made_with, TrackOptions, frame loop) of a ``--tracker sam2`` run; checks the
    checkpoints (and the concept against its model) before anything is run."""
    from persam.method.finetune import FinetuneSettings
    from persam.runs.defaults import DEFAULT_MODEL
    from persam.runs.key import file_sha256
    from persam.runs.models import resolve_checkpoint
    from persam.runs.track_sam2 import (DEFAULT_REDETECT_AFTER, DEFAULT_SAM2_MIN_SIMILARITY, DEFAULT_SAM2_MODEL,
                                        Sam2FrameLoop, Sam2TrackSettings)

    model_type = args.model or DEFAULT_SAM2_MODEL
    if args.input_size is not None and args.input_size % 32:
        raise InputError(f"--input-size {args.input_size}: SAM 2.1's input side must be a multiple of 32")
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)
    sam_type = getattr(reference.concept, "model_type", None) or DEFAULT_MODEL
    sam_checkpoint = _sam_checkpoint(args, reference, sam_type)
    sam_sha256 = file_sha256(sam_checkpoint) if sam_checkpoint is not None else None
    if reference.kind == "concept":
        from persam.data.concept import load_concept

        reference.concept = load_concept(args.concept, model_type=sam_type, checkpoint_sha256=sam_sha256)
        method = getattr(reference.concept, "method", None) or "gfsam"
        if method not in ("persam", "persam_f"):
            raise InputError(f"--tracker sam2: concept {args.concept} is a {method} concept; SAM 2 takes the object "
                             f"from a PerSAM or PerSAM-F concept (or a mask / clicks / box)")
    else:
        method = "persam_f" if args.finetune else "persam"
    finetune = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    redetect_after = DEFAULT_REDETECT_AFTER if args.redetect_after is None else (args.redetect_after or None)
    if sam_checkpoint is None:
        redetect_after = None
    min_similarity = DEFAULT_SAM2_MIN_SIMILARITY if args.min_similarity is None else args.min_similarity
    settings = Sam2TrackSettings(redetect_after=redetect_after, min_similarity=min_similarity,
                                 fill_hole_area=args.fill_holes)
    made_with = {
        "reference": reference.content,
        "finetune": {"steps": args.steps, "resolution": args.finetune_resolution} if args.finetune else None,
        "tracker": "sam2", "model_type": model_type, "checkpoint_sha256": checkpoint_sha256,
        "input_size": args.input_size, "fill_holes": args.fill_holes, "redetect_after": redetect_after,
        "concept_model": sam_type if sam_checkpoint is not None else None, "concept_checkpoint_sha256": sam_sha256,
        "precision": args.precision,
    }
    info = {"tracker": "sam2", "method": method, "model_type": model_type, "checkpoint": str(checkpoint),
            "redetect_after": redetect_after, "fill_holes": args.fill_holes, "input_size": args.input_size,
            "concept_model": made_with["concept_model"],
            "concept_checkpoint": None if sam_checkpoint is None else str(sam_checkpoint)}
    options = TrackOptions(every=args.every, start=args.start, end=args.end, min_similarity=min_similarity,
                           overwrite=args.overwrite, progress=False if args.quiet else None, method=method,
                           finetune=finetune, info=info)
    factory = partial(_build_models, model_type, checkpoint, args.input_size, args.device,
                      sam_type, sam_checkpoint, args.precision, getattr(args, "backend", "auto"))
    return factory, made_with, options, partial(Sam2FrameLoop, settings=settings)


def _build_models(model_type, checkpoint, input_size, device, sam_type, sam_checkpoint, precision, backend):
    """SAM 2.1 on `device` (its image step on OpenVINO or ONNX Runtime when `backend` names one), and the
    builder of SAM (v1)'s predictor (None without its checkpoint)."""
    import torch

    from sam.sam2.build import load_sam2

    from persam.runs.models import build_predictor
    from persam.runs.track_sam2 import Sam2TrackModels

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple MPS is not available (use --device cpu)")
    model = load_sam2(model_type, checkpoint, device=device, image_size=input_size)
    if backend in ("openvino", "onnxruntime"):  # by name only: "auto" keeps SAM 2 on torch, where parity is proven
        from sam.backends import BackendUnavailable
        from sam.sam2.encoder_backends import use_backend

        from persam.runs.key import file_sha256  # remembered per process: the run's key read it already

        try:
            use_backend(model, backend, precision, sha256=file_sha256(checkpoint), threads=torch.get_num_threads())
        except BackendUnavailable as exc:
            raise InputError(f"--backend {backend}: {exc}") from None
    sam = None
    if sam_checkpoint is not None:
        sam = partial(build_predictor, sam_type, sam_checkpoint, device, precision, backend)
    return Sam2TrackModels(model, device, sam, precision)
