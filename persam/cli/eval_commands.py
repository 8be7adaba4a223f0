"""``persam eval``: benchmark runners on PerSeg, DAVIS 2017, FSS-1000 and COCO-20i.

    persam eval perseg --data DIR --out DIR [--method persam|persam_f] [--model M --checkpoint P]
                       [--classes a,b] [--pred DIR] [--device D] [--precision P] [--backend B] [--overwrite]
    persam eval davis  --data DIR --out DIR [--sequences a,b] [--max-frames N] [--pred DIR] ...
    persam eval fss    --data FSS-1000 --out DIR [--shots 1|5] [--split FILE] [--method persam|persam_f|gfsam] ...
    persam eval coco20i --data COCO2014 --out DIR --fold 0..3 [--shots 1|5] ...

`add_eval_parser(subparsers)` adds the ``eval`` subcommand to the ``persam`` parser; every
leaf sets ``func`` to a ``cmd_*(args) -> int``. Expected failures raise InputError (persam's
main turns them into one error line); :func:`main` runs the subcommand alone
(``python -m persam.cli.eval_commands perseg ...``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sam.backends import BACKEND_CHOICES
from sam.precision import PRECISIONS

from persam.cli.args import in_flags
from persam.cli.args import positive_int as _positive_int
from persam.errors import InputError
from persam.method.pipeline import METHODS
from persam.runs.defaults import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_MODEL, DEFAULT_PRECISION
from persam.runs.models import DEVICES

from eval.report import split_names
from eval.run_fewshot import FEWSHOT_METHODS, OFFICIAL_SIZE


def cmd_eval_perseg(args: argparse.Namespace) -> int:
    from eval.run_perseg import run_perseg

    run_perseg(args.data, args.out, method=args.method, model_type=args.model or DEFAULT_MODEL,
               checkpoint=args.checkpoint, classes=split_names(args.classes), pred=args.pred,
               device=args.device, precision=args.precision, progress=not args.quiet, backend=args.backend,
               overwrite=args.overwrite)
    return 0


def _davis_model(args: argparse.Namespace) -> str:
    """--model, checked against --tracker (a SAM 2.1 model for sam2, SAM's for persam)."""
    from sam.download import MODELS

    family = MODELS[args.model].family if args.model in MODELS else None
    if args.tracker == "sam2":
        if args.model is not None and family != "sam2":
            raise InputError(f"--tracker sam2 takes a SAM 2.1 --model (sam2.1_hiera_t|s|b+|l), not {args.model}")
        if args.input_size is not None and args.input_size % 32:
            raise InputError(f"--input-size {args.input_size}: SAM 2.1's input side must be a multiple of 32")
        return args.model or "sam2.1_hiera_t"
    if family == "sam2":
        raise InputError(f"--model {args.model} is a SAM 2.1 model: use it with --tracker sam2")
    if args.input_size is not None:
        raise InputError("--input-size is for --tracker sam2")
    return args.model or DEFAULT_MODEL


def cmd_eval_davis(args: argparse.Namespace) -> int:
    from eval.datasets import SplitFileError
    from eval.run_davis import run_davis

    model_type = _davis_model(args)
    try:
        run_davis(args.data, args.out, method=args.method, model_type=model_type,
                  checkpoint=args.checkpoint, sequences=split_names(args.sequences), max_frames=args.max_frames,
                  pred=args.pred, device=args.device, precision=args.precision, year=args.year,
                  split=None if args.split == "all" else args.split, resolution=args.resolution,
                  use_previous_box=not args.no_previous_box, progress=not args.quiet, backend=args.backend,
                  overwrite=args.overwrite, tracker=args.tracker, input_size=args.input_size)
    except SplitFileError as exc:  # the library names its argument; say it in flags here
        raise InputError(
            f"--split {exc.split} --year {exc.year}: DAVIS split file {exc.split_file} not found; "
            f"pass --split all for every sequence folder, or another --split / --year"
        ) from None
    return 0


def _fewshot_settings(args: argparse.Namespace) -> dict:
    return dict(method=args.method, model_type=args.model or DEFAULT_MODEL, checkpoint=args.checkpoint,
                size=args.img_size, max_episodes=args.max_episodes, pred=args.pred, device=args.device,
                precision=args.precision, backend=args.backend, dinov2=args.dinov2,
                dinov2_checkpoint=args.dinov2_checkpoint, progress=not args.quiet, overwrite=args.overwrite)


def cmd_eval_fss(args: argparse.Namespace) -> int:
    from eval.run_fewshot import run_fss

    run_fss(args.data, args.out, shots=args.shots, split=args.split, seed=args.seed, **_fewshot_settings(args))
    return 0


def cmd_eval_coco20i(args: argparse.Namespace) -> int:
    from eval.run_fewshot import run_coco20i

    run_coco20i(args.data, args.out, fold=args.fold, shots=args.shots, split=args.split, seed=args.seed,
                **_fewshot_settings(args))
    return 0


def _fewshot_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--shots", type=_positive_int, default=1, metavar="K", help="support images per episode (default 1)")
    q.add_argument("--seed", type=int, default=0, help="the episodes' seed (default 0, the official one)")
    q.add_argument("--img-size", type=int, default=OFFICIAL_SIZE, metavar="S",
                   help=f"images and masks are resized to S x S squares, as the official evaluation does "
                        f"(default {OFFICIAL_SIZE}); 0 keeps their own size")
    q.add_argument("--max-episodes", type=_positive_int, default=None, metavar="N",
                   help="only the first N episodes (a quick check; the mean then runs over the classes they reach)")
    q.add_argument("--dinov2", default=None, metavar="VARIANT",
                   help="gfsam's DINOv2: vits14|vitb14|vitl14|vitg14 (default vitl14, the paper's)")
    q.add_argument("--dinov2-checkpoint", metavar="PATH", default=None,
                   help="gfsam's DINOv2 checkpoint (Meta's dinov2_<variant>_pretrain.pth)")


def _common(q: argparse.ArgumentParser, methods: Sequence[str] = METHODS) -> None:
    q.add_argument("--data", metavar="DIR", required=True, help="dataset root")
    q.add_argument("--out", metavar="DIR", required=True,
                   help="output folder (pred/, scores.csv/json/png, eval.json: what persam wrote there and how)")
    q.add_argument("--method", choices=methods, default="persam", help="default persam")
    q.add_argument("--model", default=None, metavar="MODEL",
                   help=f"SAM model type (default {DEFAULT_MODEL}; vit_h is the paper's)")
    q.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="checkpoint file (default: the cached download of --model)")
    q.add_argument("--pred", metavar="DIR", default=None,
                   help="score the predictions in DIR instead of running a model")
    q.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE, help=f"default {DEFAULT_DEVICE}")
    q.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help=f"image-encoder precision (default {DEFAULT_PRECISION})")
    q.add_argument("--backend", choices=BACKEND_CHOICES, default=DEFAULT_BACKEND,
                   help="who runs the image encoder: auto (default: openvino, then onnxruntime, when installed "
                        "and on CPU; else torch), torch, openvino, onnxruntime")
    q.add_argument("--overwrite", action="store_true",
                   help="make every prediction again, removing those --out holds (default: keep the ones made "
                        "with the same settings, refuse other settings)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``perseg`` and ``davis``) to an argparse subparsers object; returns it."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate on PerSeg, DAVIS 2017, FSS-1000 or COCO-20i",
        description="Run PerSAM / PerSAM-F on a benchmark (or score existing predictions with --pred) and "
        "write per-class / per-sequence tables to stdout, scores.csv, scores.json and scores.png.",
    )
    sub = p.add_subparsers(dest="eval_dataset", metavar="DATASET")

    def missing_dataset(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=missing_dataset)

    q = sub.add_parser("perseg", help="PerSeg: mIoU and bIoU per class",
                       description="Learn each class from its reference image 00, segment the other images, "
                       "write OUT/pred/<class>/<name>.png (kept on re-runs with the same settings; other settings "
                       "are refused unless --overwrite) and score mIoU / bIoU.")
    _common(q)
    q.add_argument("--classes", metavar="A,B", default=None, help="only these classes")
    q.set_defaults(func=cmd_eval_perseg)

    q = sub.add_parser("davis", help="DAVIS 2017 semi-supervised: J, F, J&F",
                       description="Track the first frame's objects through each sequence, write "
                       "OUT/pred/<seq>/<frame>.png (finished sequences are skipped on re-runs with the same "
                       "settings; other settings are refused unless --overwrite) and score "
                       "J, F and J&F (first and last frames excluded).")
    _common(q)
    q.add_argument("--sequences", metavar="A,B", default=None, help="only these sequences")
    q.add_argument("--max-frames", type=_positive_int, default=None, metavar="N",
                   help="only the first N frames of each sequence")
    q.add_argument("--year", default="2017", help="ImageSets year (default 2017)")
    q.add_argument("--split", default="val", help="ImageSets split (default val; 'all' for every sequence folder)")
    q.add_argument("--resolution", default="480p", help="default 480p")
    q.add_argument("--no-previous-box", action="store_true",
                   help="do not prompt with the previous frame's box and its centre")
    q.add_argument("--tracker", choices=("persam", "sam2"), default="persam",
                   help="persam (default): PerSAM's video method (--method); sam2: SAM 2.1 follows the first-frame "
                        "masks (--model sam2.1_hiera_t|s|b+|l, default sam2.1_hiera_t), set up as Meta evaluates it")
    q.add_argument("--input-size", type=_positive_int, default=None, metavar="S",
                   help="sam2: the model's square input side, a multiple of 32 (default 1024)")
    q.set_defaults(func=cmd_eval_davis)

    q = sub.add_parser("fss", help="FSS-1000 few-shot: mIoU and FB-IoU over 240 test classes",
                       description="Segment each query of each test class from K supports drawn as the official "
                       "HSNet / GF-SAM loader draws them, write OUT/pred/<class>/<N>.png (kept on re-runs with the "
                       "same settings) and score mIoU / FB-IoU as the official evaluation does.")
    _common(q, FEWSHOT_METHODS)
    q.add_argument("--split", metavar="FILE", default=None,
                   help="class list, one a line (default: the standard 240-class test split shipped with persam)")
    _fewshot_options(q)
    q.set_defaults(func=cmd_eval_fss)

    q = sub.add_parser("coco20i", help="COCO-20i few-shot: mIoU and FB-IoU of one fold (1000 episodes)",
                       description="The HSNet / Matcher / GF-SAM protocol: 1000 episodes of the fold's 20 classes, "
                       "drawn with the official seed from COCO2014/val2014 and its class masks "
                       "COCO2014/annotations/val2014/*.png; OUT/pred/fold<k>/<episode>_<image>.png, mIoU, FB-IoU.")
    _common(q, FEWSHOT_METHODS)
    q.add_argument("--fold", type=int, choices=range(4), required=True, metavar="0..3", help="the test fold")
    q.add_argument("--split", metavar="FILE", default=None,
                   help="images per class: persam's JSON or an official splits/val/fold<k>.pkl (read as plain data) "
                        "(default: the official lists shipped with persam)")
    _fewshot_options(q)
    q.set_defaults(func=cmd_eval_coco20i)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persam")
    add_eval_parser(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``persam eval ...`` on its own; argv without the leading "eval" is accepted too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        argv = ["eval"] + argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, ValueError, OSError) as exc:
        print(f"persam: error: {in_flags(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
