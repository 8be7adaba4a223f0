"""Command-line interface: ``persam SUBCOMMAND ...``.

    persam download MODEL                      fetch a checkpoint into the cache
    persam segment --ref-image IMG (--ref-mask M | --ref-point X,Y ... | --ref-box X0,Y0,X1,Y1)
                   TARGET... --out DIR         learn from the reference, segment the targets
    persam learn   --ref-image IMG ... --out concept.pt
    persam apply   CONCEPT TARGET... --out DIR
    persam track   VIDEO --out DIR (--concept C | --ref-mask M | --ref-point X,Y | --ref-box B | --ref-labels L)
                                               follow the object through a video (persam.track)
    persam app     [--host H] [--port P]           the web page: personalize by clicking (persam.app)

Each subcommand is a ``cmd_NAME(args) -> int`` function registered in :func:`build_parser`
(``subparser.set_defaults(func=cmd_NAME)``).  Expected failures raise ordinary exceptions
(``CheckpointError``, ``DownloadError``, ``ValueError``, ``OSError``); :func:`main` turns them
into one ``persam: error: ...`` line on stderr and exit code 2.

Exit codes (also in ``persam --help``; see :data:`EXIT_CODES`):

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from sam.download import MODELS, DownloadError, download_checkpoint
from sam.memory import reuse_freed_memory
from sam.backends import BACKEND_CHOICES
from sam.predictor import PRECISIONS

from .cli_args import Parser as _Parser
from .cli_args import UsageError as _UsageError
from .cli_args import box as _box
from .cli_args import point as _point
from .cli_args import non_negative_int as _non_negative_int
from .cli_args import positive_float as _positive_float
from .cli_args import positive_int as _positive_int
from .cli_args import similarity as _similarity
from .io import InputError
from .models import DEFAULT_MODEL, DEVICES, build_predictor, resolve_checkpoint

if TYPE_CHECKING:  # numpy is imported where it is used: `persam --help` stays quick
    import numpy as np

PROG = "persam"
EXIT_ERROR = 2
EXIT_CODES = """\
exit codes:
  0    success: every target image was segmented (or was already done)
  1    the run finished, but some target images failed (listed in OUT/results.json)
  2    bad input: a wrong argument, or a missing or unusable file, checkpoint or concept
  130  interrupted (Ctrl-C); the outputs written so far are kept and a re-run resumes"""


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
    lines.append("  --checkpoint FILE to segment / learn / apply / eval")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# shared by segment / learn / apply

REFERENCE_MASK_FILE = "reference_mask.png"


def _object_count(text: str) -> int:
    from .run import MAX_LABELS

    value = _positive_int(text)
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


def _check_output_folder(folder: Path) -> None:
    """Make sure `folder` can be made and written into (before any slow work), without making it:
    a run refused later leaves no empty folder behind (the run makes it: persam.run.output_lock)."""
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


class _ReferenceArgument(argparse.Action):
    """--ref-image / --ref-mask / --ref-point / --ref-box of segment and learn: each value is
    appended to its own list and, in the order given, to ``ref_order`` (which --ref-image a
    prompt follows: see :func:`_reference_prompts`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        flag = self.option_strings[0]  # the flag's own name, however it was abbreviated
        namespace.ref_order = [*(getattr(namespace, "ref_order", None) or []), (flag, values)]


@dataclass
class _ReferencePrompt:
    """One reference image as given and how its object is given: a mask file, clicks or a box."""

    image: str
    mask: Optional[str] = None
    points: Optional[List[Tuple[float, float]]] = None
    box: Optional[Tuple[float, float, float, float]] = None

    def describe(self) -> str:
        """'mask M', '2 clicks (x,y; x,y)' or 'box x0,y0,x1,y1', for messages."""
        if self.mask is not None:
            return f"mask {self.mask}"
        if self.points:
            clicks = "; ".join(",".join(f"{v:g}" for v in p) for p in self.points)
            return f"{len(self.points)} click{'s' if len(self.points) > 1 else ''} ({clicks})"
        return "box " + ",".join(f"{v:g}" for v in self.box)

    def settings(self, mask_sha256: Optional[str] = None) -> dict:
        """The prompt for results.json: {"mask": file (or its sha256)}, {"points": [...]} or {"box": [...]}."""
        if self.mask is not None:
            return {"mask": mask_sha256 or self.mask}
        if self.points:
            return {"points": [list(p) for p in self.points]}
        return {"box": list(self.box)}


@dataclass
class _Reference:
    """A loaded reference image and its prompt; `mask` None until SAM makes it from the clicks or box."""

    path: Path
    image: np.ndarray
    mask: Optional[np.ndarray]
    prompt: _ReferencePrompt


def _flag_value(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _one_prompt(image: str, masks: list, points: list, boxes: list, where: str) -> _ReferencePrompt:
    """The prompt of one reference image; InputError (`where` names the image) when there is none
    or it is ambiguous."""
    if masks and (points or boxes):
        raise InputError(f"{where}give the reference as --ref-mask, or as --ref-point / --ref-box, not both")
    if points and boxes:
        raise InputError(f"{where}give the reference as --ref-point clicks or as one --ref-box, not both")
    if len(boxes) > 1:
        raise InputError(f"{where}{len(boxes)} --ref-box: give one --ref-box per reference image")
    if len(masks) > 1:
        raise InputError(f"{where}{len(masks)} --ref-mask: give one mask per reference image")
    if not (masks or points or boxes):
        raise InputError(f"{where}the reference needs --ref-mask MASK, --ref-point X,Y or --ref-box X0,Y0,X1,Y1")
    return _ReferencePrompt(image, masks[0] if masks else None, list(points) or None, boxes[0] if boxes else None)


def _reference_prompts(args: argparse.Namespace) -> List[_ReferencePrompt]:
    """Which mask, clicks or box belongs to which --ref-image; InputError (one line) when that is
    ambiguous.

    One --ref-image: every prompt is its own, in any order.  Several given by masks only: the
    k-th --ref-mask is the k-th image's (as before).  Otherwise each prompt belongs to the
    --ref-image it follows, and each image needs exactly one kind: a --ref-mask, --ref-point
    clicks, or one --ref-box."""
    images = list(args.ref_image)
    masks, points, boxes = list(args.ref_mask or []), list(args.ref_point or []), list(args.ref_box or [])
    if len(images) == 1:
        if len(masks) > 1:
            raise InputError(f"1 --ref-image but {len(masks)} --ref-mask: give one mask per reference image")
        return [_one_prompt(images[0], masks, points, boxes, "")]
    if not points and not boxes:
        if len(masks) != len(images):
            raise InputError(f"{len(images)} --ref-image but {len(masks)} --ref-mask: give one mask per reference "
                             f"image" if masks else
                             f"{len(images)} reference images need a --ref-mask, --ref-point or --ref-box each")
        return [_ReferencePrompt(image, mask) for image, mask in zip(images, masks)]
    groups: List[Tuple[str, dict]] = []
    for flag, value in getattr(args, "ref_order", None) or []:
        if flag == "--ref-image":
            groups.append((value, {"--ref-mask": [], "--ref-point": [], "--ref-box": []}))
        elif not groups:
            raise InputError(f"{flag} {_flag_value(value)} comes before any --ref-image: with several reference "
                             f"images, give each one's --ref-mask, --ref-point or --ref-box after its --ref-image")
        else:
            groups[-1][1][flag].append(value)
    prompts = []
    for image, given in groups:
        if not any(given.values()):
            raise InputError(f"reference image {image} has no --ref-mask, --ref-point or --ref-box after it: with "
                             f"several reference images, give each one's after its --ref-image")
        prompts.append(_one_prompt(image, given["--ref-mask"], given["--ref-point"], given["--ref-box"],
                                   f"reference image {image}: "))
    return prompts


def _read_references(args: argparse.Namespace) -> List[_Reference]:
    """Load and check the reference images and their masks / clicks / boxes (before the model is
    built).  The mask of a reference given by clicks or a box is None: SAM makes it."""
    from .io import check_reference_mask, load_image, load_mask

    refs = []
    for prompt in _reference_prompts(args):
        image = load_image(prompt.image)
        if not image.flags.writeable:  # torch warns on read-only arrays
            image = image.copy()
        mask = None
        if prompt.mask is not None:
            mask = check_reference_mask(load_mask(prompt.mask, image.shape, image_path=prompt.image), prompt.mask)
        else:
            h, w = image.shape[:2]
            coords = list(prompt.points or []) + ([prompt.box[:2], prompt.box[2:]] if prompt.box is not None else [])
            edge = 1 if prompt.box is not None else 0  # a box may end on the far border
            for x, y in coords:
                if not (0 <= x < w + edge and 0 <= y < h + edge):
                    kind = "box corner" if edge else "click"
                    raise InputError(
                        f"reference {kind} ({x:g}, {y:g}) is outside image {prompt.image} ({w}x{h})"
                    )
        refs.append(_Reference(Path(prompt.image), image, mask, prompt))
    return refs


def _sam_mask_files(refs: Sequence[_Reference], folder: Path, prefix: str = "") -> List[Optional[Path]]:
    """Where the mask SAM makes for each reference given by clicks or a box is saved (None for a
    reference given by its mask): PREFIXreference_mask.png for one reference, else
    PREFIXreference_mask_K.png (K: its place among the --ref-image, from 1)."""
    if len(refs) == 1:
        return [None if refs[0].mask is not None else folder / f"{prefix}{REFERENCE_MASK_FILE}"]
    stem = Path(REFERENCE_MASK_FILE).stem
    return [None if r.mask is not None else folder / f"{prefix}{stem}_{k}.png" for k, r in enumerate(refs, start=1)]


def _learn(args: argparse.Namespace, predictor, refs: Sequence[_Reference], mask_files: Sequence[Optional[Path]]):
    """The concept learned from `refs`; the masks SAM makes from clicks or boxes are saved to
    `mask_files` (see :func:`_sam_mask_files`)."""
    from .finetune import FinetuneSettings
    from .io import atomic_save_png
    from .pipeline import learn_concept
    from .target import reference_mask_from_prompts

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
    """The target images of the TARGET arguments (persam.sources.expand_sources), with its warnings
    and notes printed; InputError for a target that does not exist or when none is found.  Called
    before any slow work: before the checkpoint is read and the model loads, and before --out is made."""
    from . import cli_engine
    from .sources import Note, expand_sources

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
    with other settings: see persam.run), build the model only when something is left to do, run.

    `made_with` describes what makes the masks (the run's key), `references` are the reference
    images (skipped as targets), `writes` the files the concept factory writes into --out and
    `paths` the target images (:func:`_target_paths`; expanded here when None)."""
    from . import cli_engine
    from .run import OutputFolder, RunOptions

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
        batch_size=getattr(args, "batch_size", 1),
    )
    with OutputFolder(out_dir, options) as folder:
        targets = folder.plan(paths)
        for t in targets:
            if t.skip_reason:
                print(f"{PROG}: note: skipping {t.path}: it is the {t.skip_reason}", file=sys.stderr)
        pending = [t for t in targets if t.pending]
        done = sum(t.done for t in targets)
        if not pending:
            cli_engine.write_formats(args, folder, folder.run(None, None, targets))  # records the skipped ones
            print(f"all {done} image(s) already done in {out_dir} (use --overwrite to redo them)" if done
                  else "nothing to segment: every target is the reference image", file=sys.stderr)
            return 0
        if done:
            print(f"skipping {done} image(s) already done in {out_dir}", file=sys.stderr)
        if getattr(args, "engine", "local") == "ray":
            data = cli_engine.run_on_ray(args, folder, targets, predictor_factory, concept_factory, made_with,
                                         learns=bool(references))
        else:
            predictor = predictor_factory()
            folder.claim(targets)  # lists the outputs in results.json before any is written
            concept = concept_factory(predictor)
            data = folder.run(predictor, concept, targets)
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
    from .run import RESULTS_FILE

    names = [Path(str(r.get("image"))).name for r in (folder.records.get(t.name) for t in targets)
             if isinstance(r, dict) and r.get("status") == "ok" and not r.get("found")]
    if not names:
        return ""
    if len(names) <= NOT_FOUND_NAMED:
        return f", not found in {len(names)}: {', '.join(names)}"
    return (f", not found in {len(names)}: {', '.join(names[:NOT_FOUND_NAMED])}, ... "
            f"(see {folder.out_dir / RESULTS_FILE})")


def _model_info(model_type: str, checkpoint: Path) -> dict:
    return {"model_type": model_type, "checkpoint": str(checkpoint)}


# --------------------------------------------------------------------------------------------
# segment / learn / apply


def cmd_segment(args: argparse.Namespace) -> int:
    """``persam segment``: learn the concept from the reference and segment the targets."""
    from .run import file_sha256

    model_type = args.model or DEFAULT_MODEL
    refs = _read_references(args)
    out_dir = Path(args.out)
    paths = _target_paths(args)  # a mistyped target is refused here, before the model loads
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    holder = {}

    def predictor_factory():
        holder["predictor"] = build_predictor(model_type, checkpoint, args.device, args.precision, args.backend)
        return holder["predictor"]

    mask_files = _sam_mask_files(refs, out_dir)

    def concept_factory(predictor):
        return _learn(args, predictor, refs, mask_files)

    from .coco import reference_category

    prompts = [r.prompt for r in refs]
    masks_only = all(p.mask is not None for p in prompts)
    one = prompts[0] if len(prompts) == 1 else _ReferencePrompt("")  # the keys of one reference, as before
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
    from .concept import save_concept
    from .run import file_sha256  # remembered: resolve_checkpoint has read the cached file already

    model_type = args.model or DEFAULT_MODEL
    refs = _read_references(args)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.pt'}")
    _check_output_folder(out.parent if str(out.parent) else Path("."))
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    predictor = build_predictor(model_type, checkpoint, args.device, args.precision, args.backend)
    concept = _learn(args, predictor, refs, _sam_mask_files(refs, out.parent, prefix=f"{out.stem}_"))
    concept.name = args.name or out.stem
    save_concept(concept, out, model_type=model_type, checkpoint_sha256=file_sha256(checkpoint))
    _say_learned(args, concept, refs, model_type, checkpoint, out)
    print(out)  # stdout: the concept file alone, for scripts
    return 0


def _say_learned(args: argparse.Namespace, concept, refs: Sequence[_Reference], model_type: str, checkpoint: Path,
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
    from .concept import load_concept
    from .run import file_sha256

    concept = load_concept(args.concept)  # checks the file before any slow work
    model_type = args.model or concept.model_type or DEFAULT_MODEL
    out_dir = Path(args.out)
    paths = _target_paths(args)  # a mistyped target is refused here, before the model loads
    _check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)  # read once, for the check and the run's key
    concept = load_concept(args.concept, model_type=model_type, checkpoint_sha256=checkpoint_sha256)
    info = _model_info(model_type, checkpoint)
    info["concept"] = str(args.concept)
    info["concept_name"] = concept.name or Path(args.concept).stem  # the COCO category of --format coco
    made_with = {"method": concept.method, "concept_sha256": file_sha256(args.concept), "model_type": model_type,
                 "checkpoint_sha256": checkpoint_sha256, "precision": args.precision}
    return _run_targets(
        args, lambda: build_predictor(model_type, checkpoint, args.device, args.precision, args.backend), lambda predictor: concept,
        info, made_with, paths=paths,
    )


def cmd_track(args: argparse.Namespace) -> int:
    """``persam track``: find and follow the object through a video (the work is persam.track's)."""
    from .track import track_command

    return track_command(args)


def cmd_app(args: argparse.Namespace) -> int:
    """``persam app``: the web page (the [app] extra; the work is persam.app's)."""
    from .app import require_app_extra

    require_app_extra()
    from .app.server import is_loopback, open_socket, serve
    from .app.state import AppConfig

    model_type = args.model or DEFAULT_MODEL
    checkpoint = resolve_checkpoint(model_type, args.checkpoint)
    sock = open_socket(args.host, args.port)  # before the slow model load: a busy port fails fast
    if not is_loopback(args.host):
        print(f"{PROG}: warning: --host {args.host}: anyone who reaches this machine can use the page (there is "
              f"no login)" + ("; --allow-folders lets them read images on it" if args.allow_folders else ""),
              file=sys.stderr)
    predictor = build_predictor(model_type, checkpoint, args.device, args.precision, args.backend)
    config = AppConfig(model_type=model_type, checkpoint=checkpoint, precision=args.precision,
                       max_sessions=args.max_sessions, max_embeddings=args.max_cached_images,
                       max_megapixels=args.max_megapixels, max_session_mb=args.max_session_mb,
                       allow_folders=args.allow_folders)
    return serve(predictor, config, sock, host=args.host, quiet=args.quiet)


# --------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Personalized one-shot segmentation (PerSAM, PerSAM-F) on Segment Anything.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
        help=f"one of {', '.join(sorted(MODELS))}, or all",
    )
    p.add_argument("--cache-dir", metavar="DIR", default=None, help="download folder")
    p.add_argument("--url", metavar="URL", default=None, help="download from this URL instead")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    # segment / learn / apply
    def add_model_options(q, model_default: str = f"default {DEFAULT_MODEL}") -> None:
        q.add_argument("--model", choices=sorted(MODELS), default=None,
                       help=f"SAM model: {', '.join(sorted(MODELS))} ({model_default})")
        q.add_argument("--checkpoint", metavar="PATH", default=None,
                       help="checkpoint file (default: the cached download of --model; see `persam download`)")
        q.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
        q.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="image-encoder precision: fp32 (default); bf16: on a GPU, or on a CPU with native bf16 "
                            "(elsewhere emulated and several times slower); fp16: GPU only")
        q.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                       help="who runs the image encoder: auto (default: openvino, then onnxruntime, when installed "
                            "and on CPU; else torch), torch, openvino, onnxruntime (built once, cached)")
        q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def add_reference_options(q, several: bool) -> None:
        g = q.add_argument_group("reference (the object to find)")
        g.add_argument("--ref-image", metavar="IMG", action=_ReferenceArgument, required=True,
                       help="reference image" + (" (repeat it for a few-shot concept, each followed by its --ref-mask, "
                                                 "--ref-point clicks or --ref-box)" if several else ""))
        g.add_argument("--ref-mask", metavar="MASK", action=_ReferenceArgument, default=None,
                       help="mask of the object in the reference image (one per --ref-image)")
        g.add_argument("--ref-point", metavar="X,Y", action=_ReferenceArgument, type=_point, default=None,
                       help="a click on the object in the reference image (repeatable); SAM makes the mask")
        g.add_argument("--ref-box", metavar="X0,Y0,X1,Y1", action=_ReferenceArgument, type=_box, default=None,
                       help="a box around the object in the reference image (one per image); SAM makes the mask")
        q.set_defaults(ref_order=None)  # the reference options in the order given (_ReferenceArgument)
        g.add_argument("--finetune", action="store_true",
                       help="PerSAM-F: learn the mask-scale weights on the reference (default PerSAM, training-free)")
        g.add_argument("--steps", type=_positive_int, default=1000, metavar="N",
                       help="PerSAM-F training steps (default 1000)")
        g.add_argument("--finetune-resolution", choices=("native", "full"), default="native",
                       help="where PerSAM-F's loss is evaluated: the decoder's 256 x 256 logits (native, default, "
                            "fast) or the reference image's full size (full, as the original code)")
        g.add_argument("--name", metavar="NAME", default=None,
                       help="what the object is called, kept in the concept (the category of --format coco); "
                            "default: the concept file's name (learn) or the reference image's (segment; its "
                            "folder's when the file name is a number, as cat/00.jpg: cat)")

    def add_run_options(q) -> None:
        q.add_argument("targets", metavar="TARGET", nargs="+",
                       help="target images: files, folders of images, glob patterns, a text file of paths (.txt), a "
                            "parquet file with a path column, or s3:// gs:// file:// URIs of any of these")
        q.add_argument("--out", metavar="DIR", required=True, help="output folder")
        q.add_argument("--multi", action="store_true", help="find several objects of the concept per image")
        q.add_argument("--max-objects", type=_object_count, default=5, metavar="N",
                       help="with --multi: at most N objects per image (default 5, at most 255)")
        q.add_argument("--min-similarity", type=_similarity, default=None, metavar="S",
                       help="report no object where the peak target similarity (a cosine, -1 to 1) is below S")
        q.add_argument("--save-similarity", action="store_true", help="also write NAME_similarity.png heat maps")
        q.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="default jpg")
        q.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
        from .cli_engine import add_options as add_engine_options

        add_engine_options(q)

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
    add_model_options(p, model_default=f"default: the concept's; {DEFAULT_MODEL} for a concept that names none")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "track",
        help="find and follow the object through a video",
        description="Find the object (a concept, or a reference mask / clicks / box on a frame of the video or on "
        "another image, or a label map of several objects) in every frame of a video file (what OpenCV reads: mp4, "
        "mov, avi, mkv) or a folder of frames, following it with its box in the previous frame. Writes per "
        "processed frame a mask NNNNN.png (by frame index), overlay.mp4 and results.json into --out; an "
        "interrupted run resumes at the first missing frame. Exit code 1: the video could not be read to its end "
        "(what was done is kept).",
    )
    p.add_argument("video", metavar="VIDEO", help="a video file, or a folder of frames (sorted by name)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    g = p.add_argument_group("the object (one of --concept, --ref-mask, --ref-point, --ref-box, --ref-labels)")
    g.add_argument("--concept", metavar="CONCEPT", default=None, help="a concept file from `persam learn`")
    g.add_argument("--ref-frame", metavar="N", type=_non_negative_int, default=None,
                   help="the frame of the video the reference mask / clicks / box / labels are on (default 0)")
    g.add_argument("--ref-image", metavar="IMG", default=None,
                   help="a reference image from elsewhere, instead of a frame of the video")
    g.add_argument("--ref-mask", metavar="MASK", default=None, help="mask of the object on the reference frame / image")
    g.add_argument("--ref-point", metavar="X,Y", action="append", type=_point, default=None,
                   help="a click on the object (repeatable); SAM makes the mask (saved as reference_mask.png)")
    g.add_argument("--ref-box", metavar="X0,Y0,X1,Y1", type=_box, default=None,
                   help="a box around the object; SAM makes the mask")
    g.add_argument("--ref-labels", metavar="LABELS", default=None,
                   help="a label map of several objects on the reference frame / image (palette ids 1..N, as DAVIS "
                        "annotations); the masks are palette PNGs of the same ids")
    g.add_argument("--finetune", action="store_true", help="PerSAM-F: learn the mask-scale weights on the reference")
    g.add_argument("--steps", type=_positive_int, default=1000, metavar="N", help="PerSAM-F training steps (default 1000)")
    g.add_argument("--finetune-resolution", choices=("native", "full"), default="native",
                   help="where PerSAM-F's loss is evaluated (default native, see `persam segment --help`)")
    p.add_argument("--min-similarity", type=_similarity, default=None, metavar="S",
                   help="mark the object not found in frames where its peak target similarity (-1 to 1) is below S "
                        "(instead of forcing a mask)")
    p.add_argument("--every", type=_positive_int, default=1, metavar="K",
                   help="process every K-th frame (default 1); the overlay video then has fps / K")
    p.add_argument("--start", type=_non_negative_int, default=0, metavar="N", help="first frame (default 0)")
    p.add_argument("--end", type=_positive_int, default=None, metavar="N",
                   help="stop before frame N (default: the end of the video)")
    p.add_argument("--fps", type=_positive_float, default=None, metavar="F",
                   help="frame rate of a folder of frames, for the overlay video (default 24)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every frame (default: resume; a folder made with other settings is refused)")
    p.add_argument("--format", choices=("png", "coco"), default="png",
                   help="png (default): the masks and results.json; coco: also OUT/coco.json, COCO instances of "
                        "the frames (RLE masks, boxes, areas, scores, track_id per object)")
    add_model_options(p, model_default=f"default {DEFAULT_MODEL}; with --concept: the concept's")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser(
        "app",
        help="the web page: personalize by clicking (needs the [app] extra)",
        description="Serve the persam page: add a reference image and click on the object (or drag a box, or "
        "upload its mask), add target images, run, look at the overlays and scores, download the masks. "
        "Needs `pip install -e \".[app]\"`. Every browser gets its own session; one model serves them all.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address or name to listen on (default 127.0.0.1: this machine only, served as 127.0.0.1, "
                        "localhost and [::1]); the page answers only to this name (and a loopback address's names)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--allow-folders", action="store_true",
                   help="let the page add target images from folders and glob patterns on the server (default: "
                        "uploads only)")
    p.add_argument("--max-sessions", type=_positive_int, default=8, metavar="N",
                   help="browser sessions kept at once (default 8); a new one replaces the least recently used "
                        "session idle for 10 minutes, and is refused while every session is in use")
    p.add_argument("--max-session-mb", type=_positive_float, default=1024.0, metavar="MB",
                   help="uploads one session keeps on disk, all together (default 1024 MB)")
    p.add_argument("--max-cached-images", type=_positive_int, default=48, metavar="N",
                   help="image embeddings kept in memory, 4 MiB each (default 48); others are encoded again when needed")
    p.add_argument("--max-megapixels", type=_positive_float, default=50.0, metavar="MP",
                   help="largest image the page accepts (default 50 megapixels)")
    p.set_defaults(func=cmd_app)

    from eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


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
        return _error(str(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
