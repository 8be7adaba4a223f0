"""``persam track`` on the command line: its arguments read into the run of persam.runs.track
(:func:`track_command`); the summary line, and the exit code (0 done; 1 the video stopped early)."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from persam.cli.track_gfsam_command import check_method_flags, uses_gfsam
from persam.data.frames import FrameSource, open_video
from persam.errors import InputError
from persam.runs.records import RESULTS_FILE
from persam.runs.track import TrackOptions, run_track, write_track_coco
from persam.runs.track_reference import Reference, read_reference

__all__ = ["track_command"]


def _check_reference_flags(args) -> None:
    """Exactly one way to give the object: --concept, or one of the shapes on a frame or an image."""
    shapes = [flag for flag, given in (("--ref-mask", args.ref_mask), ("--ref-point", args.ref_point),
                                       ("--ref-box", args.ref_box is not None), ("--ref-labels", args.ref_labels))
              if given]
    if args.concept:
        if shapes or args.ref_image or args.ref_frame is not None:
            raise InputError("--concept is the whole reference: leave out --ref-image, --ref-frame and "
                             + ", ".join(shapes or ["--ref-mask / --ref-point / --ref-box / --ref-labels"]))
        if args.finetune:
            raise InputError("--finetune needs a reference mask; a concept is already learned (use `persam learn "
                             "--finetune` to make a PerSAM-F concept)")
        return
    if not shapes:
        raise InputError("the object needs --concept, or --ref-mask / --ref-point / --ref-box / --ref-labels on "
                         "--ref-frame N (default 0) or on a --ref-image")
    if len(shapes) > 1:
        raise InputError(f"give the reference as one of --ref-mask, --ref-point, --ref-box or --ref-labels, "
                         f"not {' and '.join(shapes)}")
    if args.ref_image and args.ref_frame is not None:
        raise InputError("give the reference on --ref-frame N of the video or on a --ref-image, not both")


def _read_reference(args, source: FrameSource) -> Reference:
    """The reference from the command's arguments, loaded and checked (before the model is built)."""
    _check_reference_flags(args)
    return read_reference(source, concept=args.concept, ref_image=args.ref_image, ref_frame=args.ref_frame,
                          ref_mask=args.ref_mask, ref_point=args.ref_point, ref_box=args.ref_box,
                          ref_labels=args.ref_labels)


def _check_tracker_flags(args) -> None:
    """--model of the tracker's family; the options of --tracker sam2 only with it."""
    from sam.download import MODELS

    tracker = getattr(args, "tracker", "persam")
    family = MODELS[args.model].family if args.model in MODELS else None
    if tracker == "sam2":
        if args.model is not None and family != "sam2":
            names = ", ".join(sorted(n for n, m in MODELS.items() if m.family == "sam2"))
            raise InputError(f"--tracker sam2 takes a SAM 2.1 --model ({names}), not {args.model}")
        return
    if family == "sam2":
        raise InputError(f"--model {args.model} is a SAM 2.1 model: use it with --tracker sam2")
    given = [flag for flag, name in (("--redetect-after", "redetect_after"), ("--fill-holes", "fill_holes"),
                                     ("--sam-checkpoint", "sam_checkpoint"), ("--input-size", "input_size"))
             if getattr(args, name, None) is not None]
    if given:
        raise InputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --tracker sam2")


def track_command(args) -> int:
    """``persam track``: the command (persam.cli.commands registers it).  0 done; 1 the video stopped early."""
    from persam.method.finetune import FinetuneSettings
    from persam.runs.defaults import DEFAULT_MODEL
    from persam.runs.models import build_predictor, resolve_checkpoint
    from persam.runs.key import file_sha256

    if getattr(args, "format", "png") == "coco":
        from persam.data.coco import require_pycocotools

        require_pycocotools()  # before any work
    source = open_video(args.video, fps=args.fps)
    if args.fps is not None and source.kind == "video":
        print(f"persam: note: --fps is for a folder of frames; {source.path} keeps its own {source.fps:g} fps",
              file=sys.stderr)
    _check_tracker_flags(args)
    check_method_flags(args)
    reference = _read_reference(args, source)
    if getattr(args, "tracker", "persam") == "sam2":
        from persam.cli.track_sam2_command import sam2_run_inputs

        predictor_factory, made_with, options, frame_loop = sam2_run_inputs(args, reference)
        return _run_and_report(args, source, reference, predictor_factory, made_with, options, frame_loop)
    if uses_gfsam(args, reference):  # GF-SAM on each frame on its own (persam.runs.track_gfsam)
        from persam.cli.track_gfsam_command import gfsam_run_inputs

        predictor_factory, made_with, options, frame_loop = gfsam_run_inputs(args, reference)
        return _run_and_report(args, source, reference, predictor_factory, made_with, options, frame_loop)
    concept = reference.concept
    model_type = args.model or getattr(concept, "model_type", None) or DEFAULT_MODEL
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)
    if reference.kind == "concept":
        from persam.data.concept import load_concept

        reference.concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256)
        method = reference.concept.method
    else:
        method = "persam_f" if args.finetune else "persam"
    finetune = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    made_with = {
        "reference": reference.content,
        "finetune": {"steps": args.steps, "resolution": args.finetune_resolution} if args.finetune else None,
        "model_type": model_type, "checkpoint_sha256": checkpoint_sha256, "precision": args.precision,
    }
    options = TrackOptions(
        every=args.every, start=args.start, end=args.end, min_similarity=args.min_similarity,
        overwrite=args.overwrite, progress=False if args.quiet else None, method=method, finetune=finetune,
        info={"method": method, "model_type": model_type, "checkpoint": str(checkpoint)},
    )
    backend = getattr(args, "backend", "auto")

    def predictor_factory():
        return build_predictor(model_type, checkpoint, args.device, args.precision, backend)

    return _run_and_report(args, source, reference, predictor_factory, made_with, options)


def _run_and_report(args, source, reference, predictor_factory, made_with, options, frame_loop=None) -> int:
    """The run, coco.json with --format coco, and the summary line; the exit code."""
    out_dir = Path(args.out)
    data = run_track(source, reference, out_dir, predictor_factory, made_with, options,
                     log=lambda line: tqdm.write(line, file=sys.stderr), frame_loop=frame_loop)
    if getattr(args, "format", "png") == "coco":  # OUT/coco.json: frames as images (persam.data.coco)
        name = getattr(reference.concept, "name", None) or Path(args.concept or args.video).stem
        data = write_track_coco(out_dir, data, name, source.files)
    summary = data["summary"]
    run = summary.get("this_run") or {}
    found = ", ".join(f"{'object ' + k if len(summary['found']) > 1 else 'the object'} found in {v}/{summary['frames']}"
                      for k, v in summary["found"].items())
    overlay_file = (data.get("overlay") or {}).get("file") or "(none: no frame)"
    if run.get("frames"):
        print(f"{run['frames']} frame(s) tracked in {run['seconds']:.1f} s ({run['frames_per_second']:.2f} frames/s); "
              f"{found} frames; results in {out_dir / RESULTS_FILE}, overlay {out_dir / overlay_file}",
              file=sys.stderr)
    return 1 if data.get("stopped") else 0
