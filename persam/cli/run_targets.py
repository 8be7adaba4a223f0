"""The steps `persam segment`, `learn` and `apply` share, whichever the method (persam.cli.commands
for PerSAM / PerSAM-F, persam.cli.gfsam_command for GF-SAM): the targets, the output folder, the
run through an engine and its summary line, the model options typed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from persam.cli.parser import PROG
from persam.errors import InputError
from persam.runs.defaults import DEFAULT_MODEL
from persam.runs.models import ModelSpec, build_predictor


# --------------------------------------------------------------------------------------------
# the output folder and the targets


def check_output_folder(folder: Path) -> None:
    """Make sure `folder` can be made and written into (before any slow work), without making it:
    a run refused later leaves no empty folder behind (the run makes it: persam.runs.lock.output_lock)."""
    import os
    import tempfile

    part = Path(".")
    for part in (folder, *folder.parents):  # the folder, or one on its way, may be a file
        if part.exists():
            if not part.is_dir():
                where = f"--out {folder}" if part == folder else f"--out {folder}: {part}"
                raise InputError(f"{where} is a file, not a folder")
            break
    try:
        if part == folder:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".persam-write-test-"):
                pass
        else:  # the first folder on its way that exists: a folder can be made in it
            os.rmdir(tempfile.mkdtemp(dir=part, prefix=".persam-write-test-"))
    except OSError as exc:
        where = "" if part == folder else f" (it would be made in {part})"
        raise InputError(f"output folder {folder} is not writable{where} ({exc.strerror or exc})") from None



def target_paths(args: argparse.Namespace) -> list:
    """The target images of the TARGET arguments (persam.data.sources.expand_sources), with its warnings
    and notes printed; InputError for a target that does not exist or when none is found.  Called
    before any slow work: before the checkpoint is read and the model loads, and before --out is made."""
    from persam.cli import engine as cli_engine
    from persam.data.listing import Note
    from persam.data.sources import expand_sources

    cli_engine.check(args)  # --engine ray / --format coco: their packages, before any work
    paths, messages = expand_sources(args.targets)
    for line in messages:
        print(f"{PROG}: {'note' if isinstance(line, Note) else 'warning'}: {line}", file=sys.stderr)
    if not paths:
        raise InputError(f"no target images found in {', '.join(args.targets)}")
    return paths


def run_targets(args: argparse.Namespace, predictor_factory, concept_factory, info, made_with,
                 references=(), writes=(), paths=None) -> int:
    """Lock --out, plan the targets (refusing to replace the user's files or to mix results made
    with other settings: see persam.runs.folder), build the model only when something is left to do, run.

    `made_with` describes what makes the masks (the run's key), `references` are the reference
    images (skipped as targets), `writes` the files the concept factory writes into --out and
    `paths` the target images (:func:`target_paths`; expanded here when None)."""
    from persam.cli import engine as cli_engine
    from persam.runs.folder import OutputFolder
    from persam.runs.local import run_folder
    from persam.runs.records import RunOptions

    out_dir = Path(args.out)
    if paths is None:
        paths = target_paths(args)
    options = RunOptions(
        multi=args.multi,
        max_objects=args.max_objects,
        min_similarity=args.min_similarity,
        save_similarity=args.save_similarity,
        overwrite=args.overwrite,
        overlay_format=args.overlay_format,
        progress=False if args.quiet else None,
        info=info,
        made_with=made_with,
        reference_images=references,
        extra_outputs=tuple(writes) + cli_engine.extra_outputs(args),
        batch_size=args.batch_size,
    )
    with OutputFolder(out_dir, options) as folder:
        targets = folder.plan(paths)
        for t in targets:
            if t.skip_reason:
                print(f"{PROG}: note: skipping {t.path}: it is the {t.skip_reason}", file=sys.stderr)
        pending = [t for t in targets if t.pending]
        done = sum(t.done for t in targets)
        if not pending:
            cli_engine.write_formats(args, folder, run_folder(folder, None, None, targets))  # records the skipped ones
            print(f"all {done} image(s) already done in {out_dir} (use --overwrite to redo them)" if done
                  else "nothing to segment: every target is the reference image", file=sys.stderr)
            return 0
        if done:
            print(f"skipping {done} image(s) already done in {out_dir}", file=sys.stderr)
        if args.engine == "ray":
            data = cli_engine.run_on_ray(args, folder, targets, predictor_factory, concept_factory, made_with,
                                         learns=bool(references))
        else:
            predictor = predictor_factory()
            folder.claim(targets)  # lists the outputs in results.json before any is written
            concept = concept_factory(predictor)
            data = run_folder(folder, predictor, concept, targets)
        cli_engine.write_formats(args, folder, data)
        counts = folder.run_counts()  # this run's images only (results.json's summary counts all it keeps)
        not_found = not_found_note(folder, targets)
    kept = (f"; results.json also keeps {counts['kept']} record(s) of other images from earlier runs"
            if counts["kept"] else "")
    print(
        f"{counts['segmented']} segmented, {counts['done']} already done, {counts['skipped']} skipped, "
        f"{counts['errors']} failed, object found in {counts['found']}{not_found}{kept}; "
        f"results in {out_dir / 'results.json'}",
        file=sys.stderr,
    )
    return 1 if counts["errors"] else 0


NOT_FOUND_NAMED = 3  # the summary line names at most this many photos where the object was not found


def not_found_note(folder, targets) -> str:
    """', not found in 2: a.jpg, b.jpg' for the summary line: the photos segmented in this run where
    the object was not found, the first few by name, then where to find the others; '' for none."""
    from persam.runs.records import RESULTS_FILE

    names = [Path(str(r.get("image"))).name for r in (folder.records.get(t.name) for t in targets)
             if isinstance(r, dict) and r.get("status") == "ok" and not r.get("found")]
    if not names:
        return ""
    if len(names) <= NOT_FOUND_NAMED:
        return f", not found in {len(names)}: {', '.join(names)}"
    return (f", not found in {len(names)}: {', '.join(names[:NOT_FOUND_NAMED])}, ... "
            f"(see {folder.out_dir / RESULTS_FILE})")


def model_spec(args: argparse.Namespace, model_type: Optional[str] = None) -> ModelSpec:
    """The model options, typed; `model_type` is the model when --model is not given (a concept's)."""
    return ModelSpec(args.model or model_type or DEFAULT_MODEL, args.checkpoint, args.device, args.precision,
                     args.backend)


def build(spec: ModelSpec, checkpoint: Path):
    """The predictor of `spec`, its checkpoint resolved (persam.runs.models.resolve_checkpoint)."""
    return build_predictor(spec.model_type, checkpoint, spec.device, spec.precision, spec.backend)


def model_info(model_type: str, checkpoint: Path) -> dict:
    return {"model_type": model_type, "checkpoint": str(checkpoint)}
