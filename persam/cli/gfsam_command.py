"""`persam segment / learn / apply --method gfsam`: GF-SAM (persam.method.gfsam), every instance
of the references' category, through the same engines and output folder as PerSAM
(persam.runs.gfsam_run).

The flags that are GF-SAM's: --method, --dinov2 (the DINOv2 variant; default
persam.runs.defaults.DEFAULT_DINOV2), --dinov2-checkpoint (default: the cached download, never
downloaded here) and the hidden --max-points (prompt points per image, 128 as the original).
Checked here before any slow work: :func:`method_of` refuses the flags that do not go together.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional, Sequence

from persam.cli.references import Reference, read_references, reference_pairs, sam_mask_files
from persam.cli.run_targets import build, check_output_folder, model_info, model_spec, run_targets, target_paths
from persam.errors import InputError
from persam.runs.defaults import DEFAULT_DINOV2
from persam.runs.models import ModelSpec, build_dinov2_features, resolve_checkpoint, resolve_dinov2_checkpoint

GFSAM = "gfsam"


def method_of(args: argparse.Namespace) -> str:
    """The method asked for (persam, persam_f or gfsam), the flags that go with another refused in one line."""
    method = getattr(args, "method", None) or ("persam_f" if getattr(args, "finetune", False) else "persam")
    if method == GFSAM:
        if getattr(args, "finetune", False):
            raise InputError("--finetune is PerSAM-F's; GF-SAM (--method gfsam) learns nothing to fine-tune")
        if getattr(args, "save_similarity", False):
            raise InputError("--save-similarity draws PerSAM's similarity to SAM's features; GF-SAM (--method gfsam) "
                             "has no such map")
        return method
    given = [flag for flag, value in (("--dinov2", getattr(args, "dinov2", None)),
                                      ("--dinov2-checkpoint", getattr(args, "dinov2_checkpoint", None)),
                                      ("--max-points", getattr(args, "max_points", None))) if value is not None]
    if given:
        raise InputError(f"{given[0]} is GF-SAM's; add --method gfsam (the method is {method})")
    if method == "persam_f":
        args.finetune = True
    return method


def gfsam_settings(args: argparse.Namespace, recorded: Optional[dict] = None):
    """GFSAMSettings: a concept's recorded ones (apply) or the official defaults, --max-points over them.
    The run's --min-similarity is applied by the engine (RunOptions)."""
    from persam.method.gfsam import GFSAMSettings

    known = {f.name for f in fields(GFSAMSettings)}
    settings = GFSAMSettings(**{k: v for k, v in (recorded or {}).items() if k in known and k != "min_similarity"})
    if getattr(args, "max_points", None) is not None:
        settings = replace(settings, max_points=args.max_points)
    return settings


def _settings_made_with(settings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "min_similarity"}


def _dinov2(spec: ModelSpec, variant: str, checkpoint: Path):
    return build_dinov2_features(variant, checkpoint, spec.device, spec.precision, spec.backend)


class _Models:
    """SAM and DINOv2, built together when the run has something to do (before the output folder lists
    its outputs, so that a checkpoint that does not load leaves no folder behind, as SAM's does)."""

    def __init__(self, spec: ModelSpec, checkpoint: Path, variant: str, dinov2_checkpoint: Path) -> None:
        self.spec, self.checkpoint, self.variant, self.dinov2_checkpoint = spec, checkpoint, variant, dinov2_checkpoint
        self.dinov2 = None

    def build(self):
        predictor = build(self.spec, self.checkpoint)
        self.dinov2 = _dinov2(self.spec, self.variant, self.dinov2_checkpoint)
        return predictor


def _learn(predictor, dinov2, refs: Sequence[Reference], mask_files, settings, dinov2_sha256: str):
    from persam.method.gfsam import GFSAM

    pairs, _ = reference_pairs(predictor, refs, mask_files, encode_each=False)
    gfsam = GFSAM(predictor, dinov2, settings, dinov2_sha256=dinov2_sha256)
    return gfsam.learn(pairs[0][0], pairs[0][1], *pairs[1:])


def _dinov2_info(variant: str, checkpoint: Path) -> dict:
    return {"dinov2": variant, "dinov2_checkpoint": str(checkpoint)}


def cmd_segment_gfsam(args: argparse.Namespace) -> int:
    """``persam segment --method gfsam``: learn from the references, find every instance in the targets."""
    from persam.data.coco import reference_category
    from persam.runs.gfsam_run import GFSAMTask
    from persam.runs.key import file_sha256

    spec = model_spec(args)
    refs = read_references(args)
    out_dir = Path(args.out)
    paths = target_paths(args)  # a mistyped target is refused here, before the models load
    check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(spec.model_type, spec.checkpoint)
    variant = args.dinov2 or DEFAULT_DINOV2
    dinov2_checkpoint = resolve_dinov2_checkpoint(variant, args.dinov2_checkpoint)
    dinov2_sha256 = file_sha256(dinov2_checkpoint)
    settings = gfsam_settings(args)
    mask_files = sam_mask_files(refs, out_dir)

    models = _Models(spec, checkpoint, variant, dinov2_checkpoint)

    def concept_factory(predictor):
        concept = _learn(predictor, models.dinov2, refs, mask_files, settings, dinov2_sha256)
        return GFSAMTask(concept, settings, models.dinov2)

    prompts = [r.prompt for r in refs]
    info = {**model_info(spec.model_type, checkpoint), **_dinov2_info(variant, dinov2_checkpoint)}
    info["concept_name"] = args.name or reference_category(refs[0].path)
    info["reference"] = {"images": [str(r.path) for r in refs], "prompts": [p.settings() for p in prompts]}
    made_with = {
        "method": GFSAM, "gfsam": _settings_made_with(settings),
        "reference_images": [file_sha256(r.path) for r in refs],
        "reference_prompts": [p.settings(file_sha256(p.mask) if p.mask else None) for p in prompts],
        "model_type": spec.model_type, "checkpoint_sha256": file_sha256(checkpoint), "precision": args.precision,
        "dinov2": variant, "dinov2_sha256": dinov2_sha256,
    }
    writes = tuple(f.name for f in mask_files if f is not None)
    return run_targets(args, models.build, concept_factory, info, made_with, [r.path for r in refs], writes,
                       paths=paths)


def cmd_learn_gfsam(args: argparse.Namespace) -> int:
    """``persam learn --method gfsam``: the references' DINOv2 features and masks, saved as a concept."""
    from persam.data.concept import save_concept
    from persam.runs.key import file_sha256

    spec = model_spec(args)
    refs = read_references(args)
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.pt'}")
    check_output_folder(out.parent if str(out.parent) else Path("."))
    checkpoint = resolve_checkpoint(spec.model_type, spec.checkpoint)
    variant = args.dinov2 or DEFAULT_DINOV2
    dinov2_checkpoint = resolve_dinov2_checkpoint(variant, args.dinov2_checkpoint)
    settings = gfsam_settings(args)
    predictor = build(spec, checkpoint)
    dinov2 = _dinov2(spec, variant, dinov2_checkpoint)
    mask_files = sam_mask_files(refs, out.parent, prefix=f"{out.stem}_")
    concept = _learn(predictor, dinov2, refs, mask_files, settings, file_sha256(dinov2_checkpoint))
    concept.name = args.name or out.stem
    save_concept(concept, out, model_type=spec.model_type, checkpoint_sha256=file_sha256(checkpoint))
    count = f"{len(refs)} reference image{'s' if len(refs) > 1 else ''}"
    print(f"learned concept {concept.name!r} from {count}: method gfsam (GF-SAM, training-free, every instance), "
          f"DINOv2 {variant} (checkpoint {dinov2_checkpoint.name}), model {spec.model_type} (checkpoint "
          f"{checkpoint.name}); saved to {out}", file=sys.stderr)
    for ref in refs:
        made = "" if ref.prompt.mask is not None else ", mask made by SAM"
        print(f"  {ref.path}: {ref.prompt.describe()}{made}", file=sys.stderr)
    print(out)  # stdout: the concept file alone, for scripts
    return 0


def cmd_apply_gfsam(args: argparse.Namespace, concept) -> int:
    """``persam apply`` of a GF-SAM concept (`concept`: as load_concept read it, unchecked)."""
    from persam.data.concept import load_concept
    from persam.runs.gfsam_run import GFSAMTask
    from persam.runs.key import file_sha256

    if args.save_similarity:
        method_of(argparse.Namespace(method=GFSAM, save_similarity=True))  # its one-line refusal
    spec = model_spec(args, concept.model_type)
    out_dir = Path(args.out)
    paths = target_paths(args)
    check_output_folder(out_dir)
    checkpoint = resolve_checkpoint(spec.model_type, spec.checkpoint)
    checkpoint_sha256 = file_sha256(checkpoint)
    variant = args.dinov2 or concept.dinov2_variant
    dinov2_checkpoint = resolve_dinov2_checkpoint(variant, args.dinov2_checkpoint)
    dinov2_sha256 = file_sha256(dinov2_checkpoint)
    concept = load_concept(args.concept, model_type=spec.model_type, checkpoint_sha256=checkpoint_sha256,
                           dinov2_variant=variant, dinov2_sha256=dinov2_sha256)
    settings = gfsam_settings(args, concept.settings)
    info = {**model_info(spec.model_type, checkpoint), **_dinov2_info(variant, dinov2_checkpoint)}
    info["concept"] = str(args.concept)
    info["concept_name"] = concept.name or Path(args.concept).stem
    made_with = {"method": GFSAM, "gfsam": _settings_made_with(settings), "concept_sha256": file_sha256(args.concept),
                 "model_type": spec.model_type, "checkpoint_sha256": checkpoint_sha256, "precision": args.precision,
                 "dinov2": variant, "dinov2_sha256": dinov2_sha256}

    models = _Models(spec, checkpoint, variant, dinov2_checkpoint)

    def concept_factory(predictor):  # on Ray (predictor None) each worker loads its own DINOv2
        return GFSAMTask(concept, settings, None if predictor is None else models.dinov2)

    return run_targets(args, models.build, concept_factory, info, made_with, paths=paths)
