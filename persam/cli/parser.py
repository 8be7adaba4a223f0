"""The `persam` command line's parser: every subcommand's options, declared once.

:func:`build_parser` composes the subcommands (``persam eval``'s come from persam.cli.eval_commands,
`segment` / `apply`'s engine options from persam.cli.engine); the shared options are added by
:func:`add_model_options`, :func:`add_reference_options` and :func:`add_run_options`, their
defaults taken from persam.runs.models.  The commands themselves are persam.cli.commands'.
"""

from __future__ import annotations

import argparse
from typing import Callable, Mapping

from sam.backends import BACKEND_CHOICES
from sam.download import MODELS
from sam.precision import PRECISIONS

from persam.cli.args import Parser, box, non_negative_int, point, positive_float, positive_int, similarity
from persam.cli.engine import add_options as add_engine_options
from persam.cli.references import ReferenceArgument
from persam.runs.defaults import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DINOV2, DEFAULT_MODEL, DEFAULT_PRECISION
from persam.runs.models import DEVICES

SAM2_MODELS = tuple(name for name, model in sorted(MODELS.items()) if model.family == "sam2")

PROG = "persam"
EXIT_CODES = """\
exit codes:
  0    success: every target image was segmented (or was already done)
  1    the run finished, but some target images failed (listed in OUT/results.json)
  2    bad input: a wrong argument, or a missing or unusable file, checkpoint or concept
  130  interrupted (Ctrl-C); the outputs written so far are kept and a re-run resumes"""

Command = Callable[[argparse.Namespace], int]
METHOD_CHOICES = ("persam", "persam_f", "gfsam")
DINOV2_CHOICES = ("vits14", "vitb14", "vitl14", "vitg14")  # sam.dinov2.DINOV2_VARIANTS, without loading torch


def sam_models() -> list:
    """The `--model` choices: SAM's entries of the download registry (not DINOv2's or SAM 2's)."""
    return sorted(name for name, entry in MODELS.items() if entry.family == "sam")


def _models_by_family() -> str:
    """`persam download`'s models, named by family, for its help."""
    families = {"sam": "SAM", "dinov2": "DINOv2 (GF-SAM's features)", "sam2": "SAM 2"}
    groups = {family: [] for family in families}  # SAM's first
    for name in sorted(MODELS):
        groups.setdefault(MODELS[name].family, []).append(name)
    return "; ".join(f"{families.get(family, family)}: {', '.join(names)}" for family, names in groups.items() if names)


def _manual_download_help() -> str:
    """`persam download --help` epilog: where a checkpoint downloaded by hand must go."""
    from sam.download import default_cache_dir

    cache = default_cache_dir()
    lines = [
        "without network access to the host:",
        f"  download the file by hand and save it in the cache folder, now {cache}",
        "  ($PERSAM_CACHE when set, else ~/.cache/persam), under this name:",
    ]
    width = max(len(name) for name in MODELS)
    for name in sorted(MODELS):
        entry = MODELS[name]
        lines.append(f"    {name:<{width}}  {cache / entry.filename}  from {entry.url}")
    lines.append("  `persam download MODEL` then checks it (sha256); or pass the file anywhere with")
    lines.append("  --checkpoint FILE (DINOv2's: --dinov2-checkpoint FILE) to segment / learn / apply / eval")
    return "\n".join(lines)


def _object_count(text: str) -> int:
    from persam.runs.records import MAX_LABELS

    value = positive_int(text)
    if value > MAX_LABELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LABELS} objects fit one label PNG, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 0 and 65535, got {text!r}")
    return value


def add_model_options(q, model_default: str = f"default {DEFAULT_MODEL}", more_models=()) -> None:
    """--model, --checkpoint, --device, --precision, --backend and --quiet (defaults: persam.runs.models);
    `more_models`: other --model choices than SAM's (`persam track --tracker sam2`'s)."""
    q.add_argument("--model", choices=sam_models() + list(more_models), default=None,
                   help=f"SAM model: {', '.join(sam_models())} ({model_default})")
    q.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="checkpoint file (default: the cached download of --model; see `persam download`)")
    q.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE, help=f"default {DEFAULT_DEVICE}")
    q.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="image-encoder precision: fp32 (default); bf16: on a GPU, or on a CPU with native bf16 "
                        "(elsewhere emulated and several times slower); fp16: GPU only")
    q.add_argument("--backend", choices=BACKEND_CHOICES, default=DEFAULT_BACKEND,
                   help="who runs the image encoder: auto (default: openvino, then onnxruntime, when installed "
                        "and on CPU; else torch), torch, openvino, onnxruntime (built once, cached)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_reference_options(q, several: bool) -> None:
    """The reference of segment and learn: --ref-image with its --ref-mask / --ref-point / --ref-box
    (persam.cli.references), and how the concept is learned (--finetune, --steps, ...)."""
    g = q.add_argument_group("reference (the object to find)")
    g.add_argument("--ref-image", metavar="IMG", action=ReferenceArgument, required=True,
                   help="reference image" + (" (repeat it for a few-shot concept, each followed by its --ref-mask, "
                                             "--ref-point clicks or --ref-box)" if several else ""))
    g.add_argument("--ref-mask", metavar="MASK", action=ReferenceArgument, default=None,
                   help="mask of the object in the reference image (one per --ref-image)")
    g.add_argument("--ref-point", metavar="X,Y", action=ReferenceArgument, type=point, default=None,
                   help="a click on the object in the reference image (repeatable); SAM makes the mask")
    g.add_argument("--ref-box", metavar="X0,Y0,X1,Y1", action=ReferenceArgument, type=box, default=None,
                   help="a box around the object in the reference image (one per image); SAM makes the mask")
    q.set_defaults(ref_order=None)  # the reference options in the order given (ReferenceArgument)
    g.add_argument("--finetune", action="store_true",
                   help="PerSAM-F: learn the mask-scale weights on the reference (default PerSAM, training-free)")
    g.add_argument("--steps", type=positive_int, default=1000, metavar="N",
                   help="PerSAM-F training steps (default 1000)")
    g.add_argument("--finetune-resolution", choices=("native", "full"), default="native",
                   help="where PerSAM-F's loss is evaluated: the decoder's 256 x 256 logits (native, default, "
                        "fast) or the reference image's full size (full, as the original code)")
    g.add_argument("--name", metavar="NAME", default=None,
                   help="what the object is called, kept in the concept (the category of --format coco); "
                        "default: the concept file's name (learn) or the reference image's (segment; its "
                        "folder's when the file name is a number, as cat/00.jpg: cat)")


def add_gfsam_options(q, method: bool = True) -> None:
    """--method (segment, learn) and GF-SAM's feature model: --dinov2, --dinov2-checkpoint, --max-points."""
    g = q.add_argument_group("GF-SAM (--method gfsam: every instance of the reference's category)")
    if method:
        g.add_argument("--method", choices=METHOD_CHOICES, default=None,
                       help="persam (default; persam_f with --finetune), persam_f, or gfsam: GF-SAM, DINOv2 "
                            "matches that prompt SAM, finding every instance")
    g.add_argument("--dinov2", choices=DINOV2_CHOICES, default=None,
                   help=f"GF-SAM's DINOv2 (default {DEFAULT_DINOV2}, the model of GF-SAM's published numbers"
                        + ("" if method else "; the concept's") + ")")
    g.add_argument("--dinov2-checkpoint", metavar="PATH", default=None,
                   help="its checkpoint (Meta's dinov2_<variant>_pretrain.pth; default: the cached download, "
                        "see `persam download dinov2_vitl14`)")
    g.add_argument("--max-points", type=positive_int, default=None, metavar="N", help=argparse.SUPPRESS)


def add_run_options(q) -> None:
    """The targets, --out and the run options of segment and apply, with the engine options."""
    q.add_argument("targets", metavar="TARGET", nargs="+",
                   help="target images: files, folders of images, glob patterns, a text file of paths (.txt), a "
                        "parquet file with a path column, or s3:// gs:// file:// URIs of any of these")
    q.add_argument("--out", metavar="DIR", required=True, help="output folder")
    q.add_argument("--multi", action="store_true", help="find several objects of the concept per image")
    q.add_argument("--max-objects", type=_object_count, default=5, metavar="N",
                   help="with --multi: at most N objects per image (default 5, at most 255)")
    q.add_argument("--min-similarity", type=similarity, default=None, metavar="S",
                   help="report no object where the peak target similarity (a cosine, -1 to 1) is below S")
    q.add_argument("--save-similarity", action="store_true", help="also write NAME_similarity.png heat maps")
    q.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="default jpg")
    q.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
    add_engine_options(q)


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The `persam` parser; `commands` maps each subcommand's name to its ``cmd_NAME(args) -> int``
    (set as the parsed arguments' ``func``)."""
    parser = Parser(
        prog=PROG,
        description="Personalized one-shot segmentation (PerSAM, PerSAM-F) on Segment Anything.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    _add_download(sub, commands["download"])
    _add_segment(sub, commands["segment"])
    _add_learn(sub, commands["learn"])
    _add_apply(sub, commands["apply"])
    _add_track(sub, commands["track"])
    _add_app(sub, commands["app"])

    from persam.cli.eval_commands import add_eval_parser

    add_eval_parser(sub)
    return parser


def _add_download(sub, command: Command) -> None:
    p = sub.add_parser(
        "download",
        help="download and verify a model checkpoint",
        description="Download a checkpoint into the cache (resuming a partial download) and "
        "print its path.  The cache is $PERSAM_CACHE, else ~/.cache/persam.",
        epilog=_manual_download_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        choices=sorted(MODELS) + ["all"],
        help=f"{_models_by_family()}; or all",
    )
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="download folder")
    p.add_argument("--url", metavar="URL", default=None, help="download from this URL instead")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=command)


def _add_segment(sub, command: Command) -> None:
    p = sub.add_parser(
        "segment",
        help="segment the reference's object in target images",
        description="Learn the object from a reference image (mask, clicks or box) and segment it in "
        "every target image. Writes NAME.png, NAME_overlay.jpg and results.json into --out; images "
        "already done are skipped unless --overwrite.",
    )
    add_reference_options(p, several=True)
    add_gfsam_options(p)
    add_run_options(p)
    add_model_options(p)
    p.set_defaults(func=command)


def _add_learn(sub, command: Command) -> None:
    p = sub.add_parser(
        "learn",
        help="learn a concept from reference image(s) and save it",
        description="Learn the object from one or more reference images and save it as a concept file "
        "(records the model type and checkpoint sha256), for `persam apply`.",
    )
    add_reference_options(p, several=True)
    add_gfsam_options(p)
    p.add_argument("--out", metavar="CONCEPT", required=True, help="concept file to write (e.g. concept.pt)")
    add_model_options(p)
    p.set_defaults(func=command)


def _add_apply(sub, command: Command) -> None:
    p = sub.add_parser(
        "apply",
        help="segment a saved concept in target images",
        description="Find a concept saved by `persam learn` in every target image (outputs as `segment`). "
        "The model must be the one the concept was learned with.",
    )
    p.add_argument("concept", metavar="CONCEPT", help="concept file from `persam learn`")
    add_run_options(p)
    add_gfsam_options(p, method=False)
    add_model_options(p, model_default=f"default: the concept's; {DEFAULT_MODEL} for a concept that names none")
    p.set_defaults(func=command)


def _add_track(sub, command: Command) -> None:
    p = sub.add_parser(
        "track",
        help="find and follow the object through a video",
        description="Find the object (a concept, or a reference mask / clicks / box on a frame of the video or on "
        "another image, or a label map of several objects) in every frame of a video file (what OpenCV reads: mp4, "
        "mov, avi, mkv) or a folder of frames, following it with its box in the previous frame. Writes per "
        "processed frame a mask NNNNN.png (by frame index), overlay.mp4 and results.json into --out; an "
        "interrupted run resumes at the first missing frame. Exit code 1: the video could not be read to its end "
        "(what was done is kept). With --method gfsam (or a concept from `persam learn --method gfsam`) GF-SAM "
        "segments each frame on its own, no box carried over from the frame before: the mask is the union of "
        "every instance of the reference's category (one object; --ref-labels is refused).",
    )
    p.add_argument("video", metavar="VIDEO", help="a video file, or a folder of frames (sorted by name)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    g = p.add_argument_group("the object (one of --concept, --ref-mask, --ref-point, --ref-box, --ref-labels)")
    g.add_argument("--concept", metavar="CONCEPT", default=None, help="a concept file from `persam learn`")
    g.add_argument("--ref-frame", metavar="N", type=non_negative_int, default=None,
                   help="the frame of the video the reference mask / clicks / box / labels are on (default 0)")
    g.add_argument("--ref-image", metavar="IMG", default=None,
                   help="a reference image from elsewhere, instead of a frame of the video")
    g.add_argument("--ref-mask", metavar="MASK", default=None, help="mask of the object on the reference frame / image")
    g.add_argument("--ref-point", metavar="X,Y", action="append", type=point, default=None,
                   help="a click on the object (repeatable); SAM makes the mask (saved as reference_mask.png)")
    g.add_argument("--ref-box", metavar="X0,Y0,X1,Y1", type=box, default=None,
                   help="a box around the object; SAM makes the mask")
    g.add_argument("--ref-labels", metavar="LABELS", default=None,
                   help="a label map of several objects on the reference frame / image (palette ids 1..N, as DAVIS "
                        "annotations); the masks are palette PNGs of the same ids")
    g.add_argument("--finetune", action="store_true", help="PerSAM-F: learn the mask-scale weights on the reference")
    g.add_argument("--steps", type=positive_int, default=1000, metavar="N", help="PerSAM-F training steps (default 1000)")
    g.add_argument("--finetune-resolution", choices=("native", "full"), default="native",
                   help="where PerSAM-F's loss is evaluated (default native, see `persam segment --help`)")
    p.add_argument("--min-similarity", type=similarity, default=None, metavar="S",
                   help="mark the object not found in frames where its peak target similarity (-1 to 1) is below S "
                        "(instead of forcing a mask)")
    p.add_argument("--every", type=positive_int, default=1, metavar="K",
                   help="process every K-th frame (default 1); the overlay video then has fps / K")
    p.add_argument("--start", type=non_negative_int, default=0, metavar="N", help="first frame (default 0)")
    p.add_argument("--end", type=positive_int, default=None, metavar="N",
                   help="stop before frame N (default: the end of the video)")
    p.add_argument("--fps", type=positive_float, default=None, metavar="F",
                   help="frame rate of a folder of frames, for the overlay video (default 24)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every frame (default: resume; a folder made with other settings is refused)")
    p.add_argument("--format", choices=("png", "coco"), default="png",
                   help="png (default): the masks and results.json; coco: also OUT/coco.json, COCO instances of "
                        "the frames (RLE masks, boxes, areas, scores, track_id per object)")
    _add_track_sam2_options(p)
    add_gfsam_options(p)
    add_model_options(p, model_default=f"default {DEFAULT_MODEL}; with --concept: the concept's; with --tracker "
                                       f"sam2: one of {', '.join(SAM2_MODELS)}, default sam2.1_hiera_t",
                     more_models=SAM2_MODELS)
    p.set_defaults(func=command)


def _add_track_sam2_options(p) -> None:
    """`persam track --tracker sam2` and its options (persam.runs.track_sam2)."""
    from persam.runs.track_sam2 import DEFAULT_REDETECT_AFTER, DEFAULT_SAM2_MIN_SIMILARITY

    g = p.add_argument_group("the tracker")
    g.add_argument("--tracker", choices=("persam", "sam2"), default="persam",
                   help="persam (default): PerSAM on every frame, prompted with the previous frame's box; sam2: SAM "
                        "2.1 follows the object with its memory of the frames before (--model sam2.1_hiera_*), the "
                        "concept finds it where it has no mask and finds it again when SAM 2 lost it")
    g.add_argument("--redetect-after", type=non_negative_int, default=None, metavar="K",
                   help=f"sam2: after K processed frames without the object the concept looks for it again on each "
                        f"frame and SAM 2 restarts where it is found (default {DEFAULT_REDETECT_AFTER}; 0: never); "
                        f"the concept finds it where its peak similarity is at least --min-similarity (default "
                        f"{DEFAULT_SAM2_MIN_SIMILARITY} with sam2)")
    g.add_argument("--fill-holes", type=non_negative_int, default=None, metavar="N",
                   help="sam2: fill holes of at most N low-resolution pixels in the masks, as Meta's predictor on a "
                        "GPU (default 8; 0: off)")
    g.add_argument("--sam-checkpoint", metavar="PATH", default=None,
                   help="sam2: the SAM checkpoint the concept uses (the concept's model, or vit_t to learn one from "
                        "the reference; default: its cached download)")
    g.add_argument("--input-size", type=positive_int, default=None, metavar="S",
                   help="sam2: the model's square input side, a multiple of 32 (default 1024, as SAM 2.1 was trained; "
                        "smaller is faster and coarser)")


def _add_app(sub, command: Command) -> None:
    p = sub.add_parser(
        "app",
        help="the web page: personalize by clicking (needs the [app] extra)",
        description="Serve the persam page: add a reference image and click on the object (or drag a box, or "
        "upload its mask), add target images, run, look at the overlays and scores, download the masks. "
        "Needs `pip install -e \".[app]\"`. Every browser gets its own session; one model serves them all.",
    )
    add_model_options(p)
    add_gfsam_options(p, method=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="address or name to listen on (default 127.0.0.1: this machine only, served as 127.0.0.1, "
                        "localhost and [::1]); the page answers only to this name (and a loopback address's names)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--allow-folders", action="store_true",
                   help="let the page add target images from folders and glob patterns on the server (default: "
                        "uploads only)")
    p.add_argument("--max-sessions", type=positive_int, default=8, metavar="N",
                   help="browser sessions kept at once (default 8); a new one replaces the least recently used "
                        "session idle for 10 minutes, and is refused while every session is in use")
    p.add_argument("--max-session-mb", type=positive_float, default=1024.0, metavar="MB",
                   help="uploads one session keeps on disk, all together (default 1024 MB)")
    p.add_argument("--max-cached-images", type=positive_int, default=48, metavar="N",
                   help="image embeddings kept in memory, 4 MiB each (default 48); others are encoded again when needed")
    p.add_argument("--max-megapixels", type=positive_float, default=50.0, metavar="MP",
                   help="largest image the page accepts (default 50 megapixels)")
    p.set_defaults(func=command)
