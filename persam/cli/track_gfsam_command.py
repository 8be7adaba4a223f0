"""``persam track --method gfsam`` (or ``--concept`` of a GF-SAM concept): its arguments read into the
run of persam.runs.track with persam.runs.track_gfsam's frame loop (:func:`gfsam_run_inputs`).

GF-SAM segments each processed frame on its own (no box carried over from the frame before): object 1
is the union of the category's instances in that frame.  Two models: SAM (``--model``, ``--checkpoint``;
with a concept, the concept's) and DINOv2 (``--dinov2``, ``--dinov2-checkpoint``; with a concept, the
concept's variant).  :func:`check_method_flags` (before the reference is read) and
:func:`uses_gfsam` (after) refuse, in one line, the flags that do not go together.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from functools import partial

from persam.errors import InputError
from persam.runs.track import TrackOptions
from persam.runs.track_reference import Reference

__all__ = ["check_method_flags", "uses_gfsam", "gfsam_run_inputs"]

GFSAM = "gfsam"


def _dinov2_flags(args) -> list:
    return [flag for flag, name in (("--dinov2", "dinov2"), ("--dinov2-checkpoint", "dinov2_checkpoint"),
                                    ("--max-points", "max_points")) if getattr(args, name, None) is not None]


def check_method_flags(args: argparse.Namespace) -> None:
    """--method's checks that need no reference: gfsam with several objects, the SAM 2 tracker or --finetune
    refused; persam_f sets --finetune."""
    asked = getattr(args, "method", None)
    tracker = getattr(args, "tracker", "persam")
    if tracker == "sam2" and (asked == GFSAM or _dinov2_flags(args)):
        flag = "--method gfsam" if asked == GFSAM else _dinov2_flags(args)[0]
        raise InputError(f"{flag} is for the default tracker (GF-SAM on each frame); --tracker sam2 follows the "
                         f"object of a PerSAM concept or of a mask / clicks / box")
    if asked == GFSAM and args.ref_labels:
        raise InputError("--ref-labels: GF-SAM (--method gfsam) finds every instance of ONE category (object 1, "
                         "their union); give the category's --ref-mask, or track several objects without --method "
                         "gfsam")
    if asked == GFSAM and args.finetune:
        raise InputError("--finetune is PerSAM-F's; GF-SAM (--method gfsam) learns nothing to fine-tune")
    if asked == "persam_f" and not args.concept:
        args.finetune = True  # as --finetune (a concept's method is the concept's)


def uses_gfsam(args: argparse.Namespace, reference: Reference) -> bool:
    """True for a GF-SAM run: --method gfsam, or a GF-SAM concept.  A --method that is not the concept's,
    and GF-SAM's flags in a run of another method, are refused.  --method persam_f sets --finetune."""
    from persam.cli.gfsam_command import method_of

    asked = getattr(args, "method", None)
    if reference.kind != "concept":
        return method_of(args) == GFSAM  # refuses GF-SAM's flags without it; persam_f: --finetune
    concept_method = getattr(reference.concept, "method", None)
    if asked is not None and asked != concept_method:
        raise InputError(f"--method {asked}: concept {args.concept} is a {concept_method} concept (the concept "
                         f"decides the method; leave out --method)")
    if concept_method != GFSAM and _dinov2_flags(args):
        raise InputError(f"{_dinov2_flags(args)[0]} is GF-SAM's; concept {args.concept} is a {concept_method} "
                         f"concept")
    return concept_method == GFSAM


def gfsam_run_inputs(args: argparse.Namespace, reference: Reference):
    """(models factory, made_with, TrackOptions, frame loop) of a GF-SAM track run; the checkpoints (and a
    concept against its SAM and DINOv2 models) are checked here, before anything is run."""
    from persam.cli.gfsam_command import gfsam_settings
    from persam.runs.defaults import DEFAULT_DINOV2, DEFAULT_MODEL
    from persam.runs.key import file_sha256
    from persam.runs.models import resolve_checkpoint, resolve_dinov2_checkpoint
    from persam.runs.track_gfsam import GFSAMFrameLoop, check_one_category

    check_one_category(reference)
    concept = reference.concept
    model_type = args.model or getattr(concept, "model_type", None) or DEFAULT_MODEL
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)
    variant = args.dinov2 or getattr(concept, "dinov2_variant", None) or DEFAULT_DINOV2
    dinov2_checkpoint = resolve_dinov2_checkpoint(variant, args.dinov2_checkpoint)
    dinov2_sha256 = file_sha256(dinov2_checkpoint)
    if reference.kind == "concept":
        from persam.data.concept import load_concept

        reference.concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256,
                                         dinov2_variant=variant, dinov2_sha256=dinov2_sha256)
    settings = gfsam_settings(args, reference.concept.settings if reference.kind == "concept" else None)
    made_with = {
        "reference": reference.content,
        "gfsam": {k: v for k, v in asdict(settings).items() if k != "min_similarity"},  # the run's is in the key
        "model_type": model_type, "checkpoint_sha256": checkpoint_sha256, "precision": args.precision,
        "dinov2": variant, "dinov2_sha256": dinov2_sha256,
    }
    info = {"method": GFSAM, "model_type": model_type, "checkpoint": str(checkpoint), "dinov2": variant,
            "dinov2_checkpoint": str(dinov2_checkpoint), "per_frame": True}
    options = TrackOptions(every=args.every, start=args.start, end=args.end, min_similarity=args.min_similarity,
                           overwrite=args.overwrite, progress=False if args.quiet else None, method=GFSAM,
                           use_previous_box=False, info=info)
    factory = partial(_build_models, model_type, checkpoint, variant, dinov2_checkpoint, args.device, args.precision,
                      getattr(args, "backend", "auto"))
    return factory, made_with, options, partial(GFSAMFrameLoop, settings=settings, dinov2_sha256=dinov2_sha256)


def _build_models(model_type, checkpoint, variant, dinov2_checkpoint, device, precision, backend):
    """(SamPredictor, DINOv2) on `device`, each on the encoder `backend`."""
    from persam.runs.models import build_dinov2_features, build_predictor

    predictor = build_predictor(model_type, checkpoint, device, precision, backend)
    return predictor, build_dinov2_features(variant, dinov2_checkpoint, device, precision, backend)
