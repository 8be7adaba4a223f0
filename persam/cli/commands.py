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
by persam.cli.references, the steps segment / learn / apply share are persam.cli.run_targets', and
``--method gfsam`` (GF-SAM) is persam.cli.gfsam_command's.  Expected failures raise ordinary exceptions
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

from sam.checkpoint_fit import check_checkpoint_fits
from sam.download import MODELS, DownloadError, download_checkpoint
from sam.memory import reuse_freed_memory
from sam.precision import EmulatedBF16Warning

from persam.cli import parser as cli_parser
from persam.cli.args import UsageError as _UsageError
from persam.cli.args import in_flags
from persam.cli.parser import PROG
from persam.cli.references import Reference, ReferencePrompt, read_references, reference_pairs, sam_mask_files
from persam.errors import InputError
from persam.cli.run_targets import check_output_folder, model_info, model_spec, run_targets, target_paths
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
                check_fits=check_checkpoint_fits,
            )
        except (DownloadError, ValueError, OSError) as exc:
            status = _error(f"{name}: {exc}" if len(names) > 1 else exc)
            continue
        print(path)
    return status



def _learn(args: argparse.Namespace, predictor, refs: Sequence[Reference], mask_files: Sequence[Optional[Path]]):
    """The concept learned from `refs`; the masks SAM makes from clicks or boxes are saved to
    `mask_files` (see :func:`sam_mask_files`)."""
    from persam.method.finetune import FinetuneSettings
    from persam.method.pipeline import learn_concept

    pairs, encoded = reference_pairs(predictor, refs, mask_files)
    method = "persam_f" if args.finetune else "persam"
    settings = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    return learn_concept(predictor, pairs, method=method, finetune=settings, encoded=encoded)


def build(spec: ModelSpec, checkpoint: Path):
    """The predictor of `spec`, its checkpoint resolved (persam.runs.models.resolve_checkpoint; the
    tests replace this module's build_predictor)."""
    return build_predictor(spec.model_type, checkpoint, spec.device, spec.precision, spec.backend)


# --------------------------------------------------------------------------------------------
# segment / learn / apply


def cmd_segment(args: argparse.Namespace) -> int:
    """``persam segment``: learn the concept from the reference and segment the targets."""
    from persam.cli.gfsam_command import cmd_segment_gfsam, method_of
    from persam.runs.key import file_sha256

    if method_of(args) == "gfsam":
        return cmd_segment_gfsam(args)

    spec = model_spec(args)
    model_type = spec.model_type
    refs = read_references(args)
    out_dir = Path(args.out)
    paths = target_paths(args)  # a mistyped target is refused here, before the model loads
    check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    holder = {}

    def predictor_factory():
        holder["predictor"] = build(spec, checkpoint)
        return holder["predictor"]

    mask_files = sam_mask_files(refs, out_dir)

    def concept_factory(predictor):
        return _learn(args, predictor, refs, mask_files)

    from persam.data.coco import reference_category

    prompts = [r.prompt for r in refs]
    masks_only = all(p.mask is not None for p in prompts)
    one = prompts[0] if len(prompts) == 1 else ReferencePrompt("")  # the keys of one reference, as before
    info = model_info(model_type, checkpoint)
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
    return run_targets(args, predictor_factory, concept_factory, info, made_with, [r.path for r in refs], writes,
                        paths=paths)


def cmd_learn(args: argparse.Namespace) -> int:
    """``persam learn``: learn a concept from the reference(s) and save it."""
    from persam.cli.gfsam_command import cmd_learn_gfsam, method_of
    from persam.data.concept import save_concept
    from persam.runs.key import file_sha256  # remembered: resolve_checkpoint has read the cached file already

    if method_of(args) == "gfsam":
        return cmd_learn_gfsam(args)
    spec = model_spec(args)
    model_type = spec.model_type
    refs = read_references(args)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.pt'}")
    check_output_folder(out.parent if str(out.parent) else Path("."))
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    predictor = build(spec, checkpoint)
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
    if concept.method == "gfsam":
        from persam.cli.gfsam_command import cmd_apply_gfsam

        return cmd_apply_gfsam(args, concept)
    if args.dinov2 or args.dinov2_checkpoint or args.max_points:
        raise InputError(f"--dinov2, --dinov2-checkpoint and --max-points are GF-SAM's; {args.concept} is a "
                         f"{concept.method} concept")
    spec = model_spec(args, concept.model_type)
    model_type = spec.model_type
    out_dir = Path(args.out)
    paths = target_paths(args)  # a mistyped target is refused here, before the model loads
    check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)  # read once, for the check and the run's key
    concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256)
    info = model_info(model_type, checkpoint)
    info["concept"] = str(args.concept)
    info["concept_name"] = concept.name or Path(args.concept).stem  # the COCO category of --format coco
    made_with = {"method": concept.method, "concept_sha256": file_sha256(args.concept), "model_type": model_type,
                 "checkpoint_sha256": checkpoint_sha256, "precision": args.precision}
    return run_targets(
        args, lambda: build(spec, checkpoint), lambda predictor: concept,
        info, made_with, paths=paths,
    )


def cmd_track(args: argparse.Namespace) -> int:
    """``persam track``: find and follow the object through a video (the work is persam.runs.track's)."""
    from persam.cli.track_command import track_command

    return track_command(args)


def _app_dinov2(args: argparse.Namespace) -> dict:
    """The page's GF-SAM: its DINOv2 (--dinov2-checkpoint, else the cached download of --dinov2 when
    there is one), or why the page shows it disabled."""
    from persam.errors import SettingError
    from persam.runs.defaults import DEFAULT_DINOV2
    from persam.runs.models import resolve_dinov2_checkpoint

    variant = args.dinov2 or DEFAULT_DINOV2
    if args.max_points is not None:
        raise InputError("--max-points is `persam segment`'s; the page runs GF-SAM with the official settings")
    try:
        checkpoint = resolve_dinov2_checkpoint(variant, args.dinov2_checkpoint, log=None)
    except SettingError:
        if args.dinov2_checkpoint:
            raise
        why = (f"GF-SAM needs a DINOv2 checkpoint: start `persam app` with --dinov2-checkpoint PATH (or run "
               f"`persam download dinov2_{variant}` first)")
        return {"dinov2_variant": None, "dinov2_checkpoint": None, "gfsam_unavailable": why}
    return {"dinov2_variant": variant, "dinov2_checkpoint": checkpoint}


def cmd_app(args: argparse.Namespace) -> int:
    """``persam app``: the web page (the [app] extra; the work is persam.app's)."""
    from persam.app import require_app_extra

    require_app_extra()
    from persam.app.guard import is_loopback
    from persam.app.server import open_socket, serve
    from persam.app.settings import AppConfig

    spec = model_spec(args)
    model_type = spec.model_type
    checkpoint = resolve_checkpoint(model_type, spec.checkpoint)
    sock = open_socket(args.host, args.port)  # before the slow model load: a busy port fails fast
    if not is_loopback(args.host):
        print(f"{PROG}: warning: --host {args.host}: anyone who reaches this machine can use the page (there is "
              f"no login)" + ("; --allow-folders lets them read images on it" if args.allow_folders else ""),
              file=sys.stderr)
    dinov2 = _app_dinov2(args)
    predictor = build(spec, checkpoint)
    config = AppConfig(model_type=model_type, checkpoint=checkpoint, precision=args.precision,
                       max_sessions=args.max_sessions, max_embeddings=args.max_cached_images,
                       max_megapixels=args.max_megapixels, max_session_mb=args.max_session_mb,
                       allow_folders=args.allow_folders, **dinov2)
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
                warnings.simplefilter("ignore", EmulatedBF16Warning)
            return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (DownloadError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return _error(in_flags(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
