"""The reference of `persam segment` / `learn`: --ref-image / --ref-mask / --ref-point / --ref-box read
into references (an image and its mask, clicks or box), checked before the model is built.

:class:`ReferenceArgument` records the order the options were given in; :func:`reference_prompts`
pairs each prompt with its --ref-image; :func:`read_references` loads and checks the files.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from persam.errors import InputError

if TYPE_CHECKING:  # numpy is imported where it is used: `persam --help` stays quick
    import numpy as np


class ReferenceArgument(argparse.Action):
    """--ref-image / --ref-mask / --ref-point / --ref-box of segment and learn: each value is
    appended to its own list and, in the order given, to ``ref_order`` (which --ref-image a
    prompt follows: see :func:`reference_prompts`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        flag = self.option_strings[0]  # the flag's own name, however it was abbreviated
        namespace.ref_order = [*(getattr(namespace, "ref_order", None) or []), (flag, values)]


@dataclass
class ReferencePrompt:
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
class Reference:
    """A loaded reference image and its prompt; `mask` None until SAM makes it from the clicks or box."""

    path: Path
    image: np.ndarray
    mask: Optional[np.ndarray]
    prompt: ReferencePrompt


def _flag_value(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _one_prompt(image: str, masks: list, points: list, boxes: list, where: str) -> ReferencePrompt:
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
    return ReferencePrompt(image, masks[0] if masks else None, list(points) or None, boxes[0] if boxes else None)


def reference_prompts(args: argparse.Namespace) -> List[ReferencePrompt]:
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
        return [ReferencePrompt(image, mask) for image, mask in zip(images, masks)]
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


def read_references(args: argparse.Namespace) -> List[Reference]:
    """Load and check the reference images and their masks / clicks / boxes (before the model is
    built).  The mask of a reference given by clicks or a box is None: SAM makes it."""
    from persam.data.io import check_reference_mask, load_image, load_mask

    refs = []
    for prompt in reference_prompts(args):
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
        refs.append(Reference(Path(prompt.image), image, mask, prompt))
    return refs


def sam_mask_files(refs: Sequence[Reference], folder: Path, prefix: str = "") -> List[Optional[Path]]:
    """Where the mask SAM makes for each reference given by clicks or a box is saved (None for a
    reference given by its mask): PREFIXreference_mask.png for one reference, else
    PREFIXreference_mask_K.png (K: its place among the --ref-image, from 1)."""
    from persam.runs.records import REFERENCE_MASK_FILE

    if len(refs) == 1:
        return [None if refs[0].mask is not None else folder / f"{prefix}{REFERENCE_MASK_FILE}"]
    stem = Path(REFERENCE_MASK_FILE).stem
    return [None if r.mask is not None else folder / f"{prefix}{stem}_{k}.png" for k, r in enumerate(refs, start=1)]


def reference_pairs(predictor, refs: Sequence[Reference], mask_files: Sequence[Optional[Path]],
                    encode_each: bool = True) -> Tuple[list, list]:
    """(the (image, mask) pair of each reference, the (embedding, original size) of each encoded
    reference).  The mask of a reference given by clicks or a box is made by SAM and saved to its
    `mask_files` entry (see :func:`sam_mask_files`); `encode_each`: encode every reference (PerSAM
    learns from the embeddings), else only those SAM makes a mask for (and nothing is returned
    for them)."""
    import sys

    from persam.data.io import atomic_save_png
    from persam.method.target import reference_mask_from_prompts

    pairs, encoded = [], []
    for ref, mask_out in zip(refs, mask_files):
        mask = ref.mask
        if encode_each or mask is None:
            predictor.set_image(ref.image)  # each reference encoded once
            if encode_each:
                encoded.append((predictor.features, predictor.original_size))
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
    return pairs, encoded

