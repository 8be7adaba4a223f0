"""Command-line interface: ``persam SUBCOMMAND ...``.

    persam download MODEL                      fetch a checkpoint into the cache
    persam segment --ref-image IMG (--ref-mask M | --ref-point X,Y ... | --ref-box X0,Y0,X1,Y1)
                   TARGET... --out DIR         learn from the reference, segment the targets
    persam learn   --ref-image IMG ... --out concept.pt
    persam apply   CONCEPT TARGET... --out DIR
    persam track   VIDEO --out DIR (--concept C | --ref-mask M | --ref-point X,Y | --ref-box B | --ref-labels L)
                                               follow the object through a video (persam.runs.track)
    persam app     [--host H] [--port P]           the web page: personalize by clicking (persam.app)

Each subcommand is a ``cmd_NAME(args) -> int`` function, listed in :data:`COMMANDS` and set as
its parsed arguments' ``func`` by persam.cli.parser (its options); the reference options are read
by persam.cli.references.  Expected failures raise ordinary exceptions
(``CheckpointError``, ``DownloadError``, ``ValueError``, ``OSError``); :func:`main` turns them
into one ``persam: error: ...`` line on stderr and exit code 2.

Exit codes (also in ``persam --help``; see persam.cli.parser.EXIT_CODES):

    0    success: every target image was segmented (or was already done)
    1    the run finished, but some target images failed (unreadable, or an error while
         segmenting them); each is listed with its error in OUT/results.json
    2    bad input: a wrong argument, or a missing or unusable file, checkpoint or concept;
         nothing was run, and one ``persam: error:`` line says why
    130  interrupted (Ctrl-C); the outputs written so far are complete and a re-run resumes
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from sam.download import MODELS, DownloadError, download_checkpoint
from sam.memory import reuse_freed_memory

from persam.cli import parser as cli_parser
from persam.cli.args import UsageError as _UsageError
from persam.cli.args import in_flags
from persam.cli.parser import PROG
from persam.cli.references import Reference, ReferencePrompt, read_references, sam_mask_files
from persam.errors import InputError
from persam.runs.defaults import DEFAULT_MODEL
from persam.runs.models import ModelSpec, build_predictor, resolve_checkpoint

EXIT_ERROR = 2


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_ERROR


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_download(args: argparse.Namespace) -> int:
    """``persam download MODEL [--cache-dir DIR] [--url URL]``: fetch and verify checkpoints."""
    names = sorted(MODELS) if args.model == "all" else [args.model]
    if args.url and len(names) > 1:
        return _error("--url can only be used with a single model, not with `all`")
    status = 0
    for name in names:
        try:
            path = download_checkpoint(
                name, cache_dir=args.cache_dir, url=args.url, progress=not args.quiet,
                warn=lambda message: print(f"{PROG}: warning: {message}", file=sys.stderr),
            )
        except (DownloadError, ValueError, OSError) as exc:
            status = _error(f"{name}: {exc}" if len(names) > 1 else exc)
            continue
        print(path)
    return status



# --------------------------------------------------------------------------------------------
# shared by segment / learn / apply


def _check_output_folder(folder: Path) -> None:
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



def _learn(args: argparse.Namespace, predictor, refs: Sequence[Reference], mask_files: Sequence[Optional[Path]]):
    """The concept learned from `refs`; the masks SAM makes from clicks or boxes are saved to
    `mask_files` (see :func:`sam_mask_files`)."""
    from persam.method.finetune import FinetuneSettings
    from persam.data.io import atomic_save_png
    from persam.method.pipeline import learn_concept
    from persam.method.target import reference_mask_from_prompts

    pairs, encoded = [], []
    for ref, mask_out in zip(refs, mask_files):
        encoded.append((predictor.set_image(ref.image), predictor.original_size))  # each reference encoded once
        mask = ref.mask
        if mask is None:
            prompt = ref.prompt
            mask = reference_mask_from_prompts(predictor, points=prompt.points, box=prompt.box)
            if mask is None:
                raise InputError(
                    f"reference image {ref.path}: SAM found no object at the given "
                    f"{'box' if prompt.box is not None else 'points'}; give --ref-mask instead"
                )
            atomic_save_png(mask_out, mask)
            print(f"reference mask made by SAM: {mask_out}", file=sys.stderr)
        pairs.append((ref.image, mask))
    method = "persam_f" if args.finetune else "persam"
    settings = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    return learn_concept(predictor, pairs, method=method, finetune=settings, encoded=encoded)


def _target_paths(args: argparse.Namespace) -> list:
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


def _run_targets(args: argparse.Namespace, predictor_factory, concept_factory, info, made_with,
                 references=(), writes=(), paths=None) -> int:
    """Lock --out, plan the targets (refusing to replace the user's files or to mix results made
    with other settings: see persam.runs.folder), build the model only when something is left to do, run.

    `made_with` describes what makes the masks (the run's key), `references` are the reference
    images (skipped as targets), `writes` the files the concept factory writes into --out and
    `paths` the target images (:func:`_target_paths`; expanded here when None)."""
    from persam.cli import engine as cli_engine
    from persam.runs.folder import OutputFolder
    from persam.runs.local import run_folder
    from persam.runs.records import RunOptions

    out_dir = Path(args.out)
    if paths is None:
        paths = _target_paths(args)
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
        not_found = _not_found_note(folder, targets)
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


def _not_found_note(folder, targets) -> str:
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


def _model_spec(args: argparse.Namespace, model_type: Optional[str] = None) -> ModelSpec:
    """The model options, typed; `model_type` is the model when --model is not given (a concept's)."""
    return ModelSpec(args.model or model_type or DEFAULT_MODEL, args.checkpoint, args.device, args.precision,
                     args.backend)


def _build(spec: ModelSpec, checkpoint: Path):
    """The predictor of `spec`, its checkpoint resolved (persam.runs.models.resolve_checkpoint)."""
    return build_predictor(spec.model_type, checkpoint, spec.device, spec.precision, spec.backend)


def _model_info(model_type: str, checkpoint: Path) -> dict:
    return {"model_type": model_type, "checkpoint": str(checkpoint)}


# --------------------------------------------------------------------------------------------
# segment / learn / apply


def cmd_segment(args: argparse.Namespace) -> int:
    """``persam segment``: learn the concept from the reference and segment the targets."""
    from persam.runs.key import file_sha256

    spec = _model_spec(args)
    model_type = spec.model_type
    refs = read_references(args)
    out_dir = Path(args.out)
    paths = _target_paths(args)  # a mistyped target is refused here, before the model loads
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    holder = {}

    def predictor_factory():
        holder["predictor"] = _build(spec, checkpoint)
        return holder["predictor"]

    mask_files = sam_mask_files(refs, out_dir)

    def concept_factory(predictor):
        return _learn(args, predictor, refs, mask_files)

    from persam.data.coco import reference_category

    prompts = [r.prompt for r in refs]
    masks_only = all(p.mask is not None for p in prompts)
    one = prompts[0] if len(prompts) == 1 else ReferencePrompt("")  # the keys of one reference, as before
    info = _model_info(model_type, checkpoint)
    info["concept_name"] = args.name or reference_category(refs[0].path)  # the COCO category of --format coco
    info["reference"] = {"images": [str(r.path) for r in refs],
                         "masks": [p.mask for p in prompts] if masks_only else None,
                         "points": [list(p) for p in one.points] if one.points else None,
                         "box": list(one.box) if one.box else None}
    made_with = {  # what makes the masks, by content: the run's key in results.json
        "method": "persam_f" if args.finetune else "persam",
        "finetune": {"steps": args.steps, "resolution": args.finetune_resolution} if args.finetune else None,
        "reference_images": [file_sha256(r.path) for r in refs],
        "reference_masks": [file_sha256(p.mask) for p in prompts] if masks_only else None,
        "reference_points": [list(p) for p in one.points] if one.points else None,
        "reference_box": list(one.box) if one.box else None,
        "model_type": model_type, "checkpoint_sha256": file_sha256(checkpoint), "precision": args.precision,
    }
    if len(prompts) > 1 and not masks_only:  # several references, some by clicks or a box: each one's
        info["reference"]["prompts"] = [p.settings() for p in prompts]
        made_with["reference_prompts"] = [p.settings(file_sha256(p.mask) if p.mask else None) for p in prompts]
    writes = tuple(f.name for f in mask_files if f is not None)
    return _run_targets(args, predictor_factory, concept_factory, info, made_with, [r.path for r in refs], writes,
                        paths=paths)


def cmd_learn(args: argparse.Namespace) -> int:
    """``persam learn``: learn a concept from the reference(s) and save it."""
    from persam.data.concept import save_concept
    from persam.runs.key import file_sha256  # remembered: resolve_checkpoint has read the cached file already

    spec = _model_spec(args)
    model_type = spec.model_type
    refs = read_references(args)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.pt'}")
    _check_output_folder(out.parent if str(out.parent) else Path("."))
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    predictor = _build(spec, checkpoint)
    concept = _learn(args, predictor, refs, sam_mask_files(refs, out.parent, prefix=f"{out.stem}_"))
    concept.name = args.name or out.stem
    save_concept(concept, out, model_type=model_type, checkpoint_sha256=file_sha256(checkpoint))
    _say_learned(args, concept, refs, model_type, checkpoint, out)
    print(out)  # stdout: the concept file alone, for scripts
    return 0


def _say_learned(args: argparse.Namespace, concept, refs: Sequence[Reference], model_type: str, checkpoint: Path,
                 out: Path) -> None:
    """What `learn` learned, on stderr: the concept, its method and model, each reference and its prompt."""
    if concept.method == "persam_f":
        method = f"persam_f (PerSAM-F, {args.steps} steps, loss at {args.finetune_resolution} resolution)"
    else:
        method = "persam (PerSAM, training-free)"
    count = f"{len(refs)} reference image{'s' if len(refs) > 1 else ''}"
    print(f"learned concept {concept.name!r} from {count}: method {method}, model {model_type} "
          f"(checkpoint {checkpoint.name}); saved to {out}", file=sys.stderr)
    for ref in refs:
        made = "" if ref.prompt.mask is not None else ", mask made by SAM"
        print(f"  {ref.path}: {ref.prompt.describe()}{made}", file=sys.stderr)


def cmd_apply(args: argparse.Namespace) -> int:
    """``persam apply``: find a saved concept in the targets."""
    from persam.data.concept import load_concept
    from persam.runs.key import file_sha256

    concept = load_concept(args.concept)  # checks the file before any slow work
    spec = _model_spec(args, concept.model_type)
    model_type = spec.model_type
    out_dir = Path(args.out)
    paths = _target_paths(args)  # a mistyped target is refused here, before the model loads
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)  # read once, for the check and the run's key
    concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256)
    info = _model_info(model_type, checkpoint)
    info["concept"] = str(args.concept)
    info["concept_name"] = concept.name or Path(args.concept).stem  # the COCO category of --format coco
    made_with = {"method": concept.method, "concept_sha256": file_sha256(args.concept), "model_type": model_type,
                 "checkpoint_sha256": checkpoint_sha256, "precision": args.precision}
    return _run_targets(
        args, lambda: _build(spec, checkpoint), lambda predictor: concept,
        info, made_with, paths=paths,
    )


def cmd_track(args: argparse.Namespace) -> int:
    """``persam track``: find and follow the object through a video (the work is persam.runs.track's)."""
    from persam.cli.track_command import track_command

    return track_command(args)


def cmd_app(args: argparse.Namespace) -> int:
    """``persam app``: the web page (the [app] extra; the work is persam.app's)."""
    from persam.app import require_app_extra

    require_app_extra()
    from persam.app.guard import is_loopback
    from persam.app.server import open_socket, serve
    from persam.app.settings import AppConfig

    spec = _model_spec(args)
    model_type = spec.model_type
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    sock = open_socket(args.host, args.port)  # before the slow model load: a busy port fails fast
    if not is_loopback(args.host):
        print(f"{PROG}: warning: --host {args.host}: anyone who reaches this machine can use the page (there is "
              f"no login)" + ("; --allow-folders lets them read images on it" if args.allow_folders else ""),
              file=sys.stderr)
    predictor = _build(spec, checkpoint)
    config = AppConfig(model_type=model_type, checkpoint=checkpoint, precision=args.precision,
                       max_sessions=args.max_sessions, max_embeddings=args.max_cached_images,
                       max_megapixels=args.max_megapixels, max_session_mb=args.max_session_mb,
                       allow_folders=args.allow_folders)
    return serve(predictor, config, sock, host=args.host, quiet=args.quiet)


# --------------------------------------------------------------------------------------------
# the parser's commands and the entry point

COMMANDS = {"download": cmd_download, "segment": cmd_segment, "learn": cmd_learn, "apply": cmd_apply,
            "track": cmd_track, "app": cmd_app}


def build_parser() -> argparse.ArgumentParser:
    """The `persam` parser (persam.cli.parser) with :data:`COMMANDS` as the subcommands' ``func``."""
    return cli_parser.build_parser(COMMANDS)


def _check_precision(args: argparse.Namespace) -> bool:
    """Refuse or warn about --precision for --device in flag terms; True when bf16 is emulated."""
    precision, device = getattr(args, "precision", None), getattr(args, "device", None)
    if precision == "fp16" and device == "cpu":
        raise InputError("--precision fp16 is not supported with --device cpu; use --precision bf16 or fp32")
    if precision == "bf16" and device == "cpu":
        from sam import predictor

        if not predictor.cpu_has_native_bf16():
            print(
                f"{PROG}: warning: --precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 "
                f"is emulated and runs several times slower than fp32 here; use --precision fp32",
                file=sys.stderr,
            )
            return True
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    reuse_freed_memory()  # see sam/memory.py: the decoder's temporaries are reused, not faulted in
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        sub_parser, message = exc.args
        return _error(f"{message} (see `{sub_parser.prog} --help`)")
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        with warnings.catch_warnings():
            if _check_precision(args):  # said in CLI terms: the library's own warning is not shown
                warnings.filterwarnings("ignore", message=r".*no native bf16", category=RuntimeWarning)
            return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (DownloadError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return _error(in_flags(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
