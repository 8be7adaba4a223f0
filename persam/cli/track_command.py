"""``persam track`` on the command line: its arguments read into the run of persam.runs.track
(:func:`track_command`); the summary line, and the exit code (0 done; 1 the video stopped early)."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from persam.data.frames import FrameSource, open_video
from persam.runs.records import RESULTS_FILE
from persam.runs.track import TrackOptions, run_track, write_track_coco
from persam.runs.track_reference import Reference, read_reference

__all__ = ["track_command"]


def _read_reference(args, source: FrameSource) -> Reference:
    """The reference from the command's arguments, loaded and checked (before the model is built)."""
    return read_reference(source, concept=args.concept, ref_image=args.ref_image, ref_frame=args.ref_frame,
                          ref_mask=args.ref_mask, ref_point=args.ref_point, ref_box=args.ref_box,
                          ref_labels=args.ref_labels, finetune=args.finetune)


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
    reference = _read_reference(args, source)
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

    out_dir = Path(args.out)
    data = run_track(source, reference, out_dir, predictor_factory, made_with, options,
                     log=lambda line: tqdm.write(line, file=sys.stderr))
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
