"""Command-line interface: ``persam SUBCOMMAND ...``.

    persam download MODEL                      fetch a checkpoint into the cache
    persam segment --ref-image IMG (--ref-mask M | --ref-point X,Y ... | --ref-box X0,Y0,X1,Y1)
                   TARGET... --out DIR         learn from the reference, segment the targets
    persam learn   --ref-image IMG ... --out concept.pt
    persam apply   CONCEPT TARGET... --out DIR

Each subcommand is a ``cmd_NAME(args) -> int`` function registered in :func:`build_parser`
(``subparser.set_defaults(func=cmd_NAME)``).  Expected failures raise ordinary exceptions
(``CheckpointError``, ``DownloadError``, ``ValueError``, ``OSError``); :func:`main` turns them
into one ``persam: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pathlib import Path

from sam.download import MODELS, DownloadError, download_checkpoint
from sam.predictor import PRECISIONS

from .io import InputError

PROG = "persam"
EXIT_ERROR = 2


class _UsageError(Exception):
    """Raised by the parser instead of exiting, so that main() returns the exit code."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(self, message)


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
                name, cache_dir=args.cache_dir, url=args.url, progress=not args.quiet
            )
        except (DownloadError, ValueError, OSError) as exc:
            status = _error(f"{name}: {exc}" if len(names) > 1 else exc)
            continue
        print(path)
    return status


# --------------------------------------------------------------------------------------------
# shared by segment / learn / apply

DEVICES = ("cpu", "cuda", "mps")
DEFAULT_MODEL = "vit_t"  # fast on CPU; vit_h is the paper's model
REFERENCE_MASK_FILE = "reference_mask.png"


def _numbers(text: str, count: int, what: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(v == v and abs(v) != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _point(text: str) -> tuple:
    return _numbers(text, 2, "X,Y (pixels)")


def _box(text: str) -> tuple:
    box = _numbers(text, 4, "X0,Y0,X1,Y1 (pixels)")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise argparse.ArgumentTypeError(f"box {text!r} is empty: X1 must exceed X0 and Y1 must exceed Y0")
    return box


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _object_count(text: str) -> int:
    from .run import MAX_LABELS

    value = _positive_int(text)
    if value > MAX_LABELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LABELS} objects fit one label PNG, got {value}")
    return value


def _check_output_folder(folder: Path) -> None:
    """Create `folder` and make sure files can be written into it (before any slow work)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".persam-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None


def resolve_checkpoint(model_type: str, checkpoint: Optional[str]) -> Path:
    """`checkpoint` when given, else the cached download of the model; never downloads."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise InputError(f"checkpoint {path}: file not found")
        return path
    from sam.download import default_cache_dir

    path = default_cache_dir() / MODELS[model_type].filename
    if not path.is_file():
        raise InputError(
            f"no checkpoint for {model_type}: {path} not found; run `persam download {model_type}` "
            f"or pass --checkpoint PATH"
        )
    return path


def build_predictor(model_type: str, checkpoint: Path, device: str, precision: str):
    """The SamPredictor for the command-line options, after checking that the device exists."""
    import torch

    from sam.build import build_sam
    from sam.predictor import SamPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: Apple MPS is not available (use --device cpu)")
    model = build_sam(model_type, checkpoint, device=device)
    return SamPredictor(model, precision=precision)


def _read_references(args: argparse.Namespace):
    """Load and check the reference images and masks/clicks/box (before the model is built).

    Returns a list of (image path, image, mask or None); the mask is None when SAM must
    make it from the clicks or the box."""
    from .io import check_reference_mask, load_image, load_mask

    images = args.ref_image
    masks = args.ref_mask or []
    prompts = bool(args.ref_point) or args.ref_box is not None
    if masks and prompts:
        raise InputError("give the reference as --ref-mask, or as --ref-point / --ref-box, not both")
    if args.ref_point and args.ref_box is not None:
        raise InputError("give the reference as --ref-point clicks or as one --ref-box, not both")
    if not masks and not prompts:
        raise InputError("the reference needs --ref-mask MASK, --ref-point X,Y or --ref-box X0,Y0,X1,Y1")
    if masks and len(masks) != len(images):
        raise InputError(
            f"{len(images)} --ref-image but {len(masks)} --ref-mask: give one mask per reference image"
        )
    if prompts and len(images) != 1:
        raise InputError("--ref-point / --ref-box describe one reference image; give exactly one --ref-image")
    refs = []
    for i, image_path in enumerate(images):
        image = load_image(image_path)
        if not image.flags.writeable:  # torch warns on read-only arrays
            image = image.copy()
        mask = None
        if masks:
            mask = check_reference_mask(load_mask(masks[i], image.shape), masks[i])
        else:
            h, w = image.shape[:2]
            coords = list(args.ref_point or []) + (
                [args.ref_box[:2], args.ref_box[2:]] if args.ref_box is not None else []
            )
            edge = 1 if args.ref_box is not None else 0  # a box may end on the far border
            for x, y in coords:
                if not (0 <= x < w + edge and 0 <= y < h + edge):
                    kind = "box corner" if edge else "click"
                    raise InputError(
                        f"reference {kind} ({x:g}, {y:g}) is outside image {image_path} ({w}x{h})"
                    )
        refs.append((Path(image_path), image, mask))
    return refs


def _learn(args: argparse.Namespace, predictor, refs, mask_out: Path):
    from .finetune import FinetuneSettings
    from .io import atomic_save_png
    from .pipeline import learn_concept
    from .target import reference_mask_from_prompts

    pairs, encoded = [], []
    for image_path, image, mask in refs:
        encoded.append((predictor.set_image(image), predictor.original_size))  # each reference encoded once
        if mask is None:
            mask = reference_mask_from_prompts(predictor, points=args.ref_point, box=args.ref_box)
            if mask is None:
                raise InputError(
                    f"reference image {image_path}: SAM found no object at the given "
                    f"{'box' if args.ref_box is not None else 'points'}; give --ref-mask instead"
                )
            atomic_save_png(mask_out, mask)
            print(f"reference mask made by SAM: {mask_out}", file=sys.stderr)
        pairs.append((image, mask))
    method = "persam_f" if args.finetune else "persam"
    settings = FinetuneSettings(steps=args.steps, loss_resolution=args.finetune_resolution) if args.finetune else None
    return learn_concept(predictor, pairs, method=method, finetune=settings, encoded=encoded)


def _run_targets(args: argparse.Namespace, predictor_factory, concept_factory, info) -> int:
    """Plan the targets, build the model only when something is left to do, run the batch."""
    from .run import RunOptions, expand_targets, plan_targets, run_batch

    out_dir = Path(args.out)
    paths, warnings = expand_targets(args.targets)
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    if not paths:
        raise InputError(f"no target images found in {', '.join(args.targets)}")
    options = RunOptions(
        multi=args.multi,
        max_objects=args.max_objects,
        min_similarity=args.min_similarity,
        save_similarity=args.save_similarity,
        overwrite=args.overwrite,
        overlay_format=args.overlay_format,
        progress=False if args.quiet else None,
        info=info,
    )
    targets = plan_targets(paths, out_dir, options)
    pending = [t for t in targets if not t.done]
    if not pending:
        print(f"all {len(targets)} image(s) already done in {out_dir} (use --overwrite to redo them)", file=sys.stderr)
        return 0
    if len(pending) < len(targets):
        print(f"skipping {len(targets) - len(pending)} image(s) already done in {out_dir}", file=sys.stderr)
    predictor = predictor_factory()
    concept = concept_factory(predictor)
    data = run_batch(predictor, concept, targets, out_dir, options)
    summary = data["summary"]
    print(
        f"{summary['segmented']} segmented, {summary['skipped']} skipped, {summary['errors']} failed, "
        f"object found in {summary['found']}; results in {out_dir / 'results.json'}",
        file=sys.stderr,
    )
    return 1 if summary["errors"] else 0


def _model_info(model_type: str, checkpoint: Path) -> dict:
    return {"model_type": model_type, "checkpoint": str(checkpoint)}


# --------------------------------------------------------------------------------------------
# segment / learn / apply


def cmd_segment(args: argparse.Namespace) -> int:
    """``persam segment``: learn the concept from the reference and segment the targets."""
    model_type = args.model or DEFAULT_MODEL
    refs = _read_references(args)
    out_dir = Path(args.out)
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    holder = {}

    def predictor_factory():
        holder["predictor"] = build_predictor(model_type, checkpoint, args.device, args.precision)
        return holder["predictor"]

    def concept_factory(predictor):
        return _learn(args, predictor, refs, out_dir / REFERENCE_MASK_FILE)

    info = _model_info(model_type, checkpoint)
    info["reference"] = {"images": [str(p) for p, _, _ in refs], "masks": args.ref_mask or None,
                         "points": args.ref_point or None, "box": list(args.ref_box) if args.ref_box else None}
    return _run_targets(args, predictor_factory, concept_factory, info)


def cmd_learn(args: argparse.Namespace) -> int:
    """``persam learn``: learn a concept from the reference(s) and save it."""
    from sam.download import sha256_file

    from .concept import save_concept

    model_type = args.model or DEFAULT_MODEL
    refs = _read_references(args)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.pt'}")
    _check_output_folder(out.parent if str(out.parent) else Path("."))
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    predictor = build_predictor(model_type, checkpoint, args.device, args.precision)
    concept = _learn(args, predictor, refs, out.with_name(f"{out.stem}_reference_mask.png"))
    save_concept(concept, out, model_type=model_type, checkpoint_sha256=sha256_file(checkpoint))
    print(out)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """``persam apply``: find a saved concept in the targets."""
    from sam.download import sha256_file

    from .concept import load_concept

    concept = load_concept(args.concept)  # checks the file before any slow work
    model_type = args.model or concept.model_type or DEFAULT_MODEL
    out_dir = Path(args.out)
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=sha256_file(checkpoint))
    info = _model_info(model_type, checkpoint)
    info["concept"] = str(args.concept)
    return _run_targets(
        args, lambda: build_predictor(model_type, checkpoint, args.device, args.precision), lambda predictor: concept, info
    )


# --------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Personalized one-shot segmentation (PerSAM, PerSAM-F) on Segment Anything.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "download",
        help="download and verify a model checkpoint",
        description="Download a checkpoint into the cache (resuming a partial download) and "
        "print its path.  The cache is $PERSAM_CACHE, else ~/.cache/persam.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        choices=sorted(MODELS) + ["all"],
        help=f"one of {', '.join(sorted(MODELS))}, or all",
    )
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="download folder")
    p.add_argument("--url", metavar="URL", default=None, help="download from this URL instead")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    # segment / learn / apply
    model_help = f"SAM model: {', '.join(sorted(MODELS))} (default {DEFAULT_MODEL}; apply: the concept's)"

    def add_model_options(q) -> None:
        q.add_argument("--model", choices=sorted(MODELS), default=None, help=model_help)
        q.add_argument("--checkpoint", metavar="PATH", default=None,
                       help="checkpoint file (default: the cached download of --model; see `persam download`)")
        q.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
        q.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="image-encoder precision (default fp32; bf16 on CPU, bf16/fp16 on GPU)")
        q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def add_reference_options(q, several: bool) -> None:
        g = q.add_argument_group("reference (the object to find)")
        g.add_argument("--ref-image", metavar="IMG", action="append", required=True,
                       help="reference image" + (" (repeat with --ref-mask for a few-shot concept)" if several else ""))
        g.add_argument("--ref-mask", metavar="MASK", action="append", default=None,
                       help="mask of the object in the reference image (one per --ref-image)")
        g.add_argument("--ref-point", metavar="X,Y", action="append", type=_point, default=None,
                       help="a click on the object in the reference image (repeatable); SAM makes the mask")
        g.add_argument("--ref-box", metavar="X0,Y0,X1,Y1", type=_box, default=None,
                       help="a box around the object in the reference image; SAM makes the mask")
        g.add_argument("--finetune", action="store_true",
                       help="PerSAM-F: learn the mask-scale weights on the reference (default PerSAM, training-free)")
        g.add_argument("--steps", type=_positive_int, default=1000, metavar="N",
                       help="PerSAM-F training steps (default 1000)")
        g.add_argument("--finetune-resolution", choices=("native", "full"), default="native",
                       help="where PerSAM-F's loss is evaluated: the decoder's 256 x 256 logits (native, default, "
                            "fast) or the reference image's full size (full, as the original code)")

    def add_run_options(q) -> None:
        q.add_argument("targets", metavar="TARGET", nargs="+",
                       help="target images: files, folders of images, or glob patterns")
        q.add_argument("--out", metavar="DIR", required=True, help="output folder")
        q.add_argument("--multi", action="store_true", help="find several objects of the concept per image")
        q.add_argument("--max-objects", type=_object_count, default=5, metavar="N",
                       help="with --multi: at most N objects per image (default 5, at most 255)")
        q.add_argument("--min-similarity", type=float, default=None, metavar="S",
                       help="report no object where the peak target similarity is below S")
        q.add_argument("--save-similarity", action="store_true", help="also write NAME_similarity.png heat maps")
        q.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="default jpg")
        q.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")

    p = sub.add_parser(
        "segment",
        help="segment the reference's object in target images",
        description="Learn the object from a reference image (mask, clicks or box) and segment it in "
        "every target image. Writes NAME.png, NAME_overlay.jpg and results.json into --out; images "
        "already done are skipped unless --overwrite.",
    )
    add_reference_options(p, several=True)
    add_run_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "learn",
        help="learn a concept from reference image(s) and save it",
        description="Learn the object from one or more reference images and save it as a concept file "
        "(records the model type and checkpoint sha256), for `persam apply`.",
    )
    add_reference_options(p, several=True)
    p.add_argument("--out", metavar="CONCEPT", required=True, help="concept file to write (e.g. concept.pt)")
    add_model_options(p)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser(
        "apply",
        help="segment a saved concept in target images",
        description="Find a concept saved by `persam learn` in every target image (outputs as `segment`). "
        "The model must be the one the concept was learned with.",
    )
    p.add_argument("concept", metavar="CONCEPT", help="concept file from `persam learn`")
    add_run_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_apply)

    from eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (DownloadError, ValueError, OSError) as exc:  # CheckpointError is a ValueError
        return _error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
