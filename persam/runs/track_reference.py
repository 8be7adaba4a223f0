"""The reference of `persam track`: what the objects are (:class:`Reference`), a concept file, or
masks (or clicks / a box) on a frame of the video or on an image, loaded and checked by
:func:`read_reference` before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from persam.data.frames import FrameSource
from persam.errors import InputError, SettingError
from persam.data.io import check_reference_mask, load_image, load_label_map, load_mask

__all__ = ["Reference", "read_reference"]


@dataclass
class Reference:
    """What the objects are: a concept, or masks (or clicks / a box) on a frame or an image.

    kind "concept": `concept` (object 1).  kind "frame": frame `frame` of the video.  kind
    "image": `image` from elsewhere.  For "frame" and "image", `masks` ({id: bool mask}) or,
    when SAM must make the mask of object 1, `points` / `box`."""

    kind: str
    concept: object = None
    frame: Optional[int] = None
    image: Optional[np.ndarray] = None
    masks: Optional[Dict[int, np.ndarray]] = None
    points: Optional[List[Tuple[float, float]]] = None
    box: Optional[Tuple[float, float, float, float]] = None
    labels: bool = False  # the masks come from a label map: palette PNG outputs
    describe: Dict[str, object] = field(default_factory=dict)  # readable, for results.json
    content: Dict[str, object] = field(default_factory=dict)  # by content, for the run's key

    @property
    def ids(self) -> List[int]:
        return sorted(self.masks) if self.masks is not None else [1]


def _check_inside(coords, w: int, h: int, edge: int, where: str) -> None:
    for x, y in coords:
        if not (0 <= x < w + edge and 0 <= y < h + edge):
            kind = "box corner" if edge else "click"
            raise InputError(f"reference {kind} ({x:g}, {y:g}) is outside {where} ({w}x{h})")


def read_reference(source: FrameSource, *, concept=None, ref_image=None, ref_frame: Optional[int] = None,
                   ref_mask=None, ref_point: Optional[Sequence[Sequence[float]]] = None,
                   ref_box: Optional[Sequence[float]] = None, ref_labels=None) -> Reference:
    """The reference, loaded and checked (before the model is built): `concept` (a concept file), or one
    of `ref_mask`, `ref_point` ([(x, y), ...]), `ref_box` (x0, y0, x1, y1) or `ref_labels` (a label map)
    on frame `ref_frame` of `source` (default 0) or on the image `ref_image`: exactly one of them, which
    the caller checks (persam.cli.track_command).  SettingError names the setting of a file that does
    not fit."""
    from persam.runs.key import file_sha256

    if concept:
        from persam.data.concept import load_concept

        loaded = load_concept(concept)  # the file is checked here; the model when it is known
        return Reference("concept", concept=loaded, describe={"concept": str(concept)},
                         content={"concept_sha256": file_sha256(concept)})
    if ref_image:
        image_path = Path(ref_image)
        image = load_image(image_path)
        where = f"reference image {image_path}"
        ref = Reference("image", image=image if image.flags.writeable else image.copy())
        ref.describe["image"] = str(image_path)
        ref.content["image_sha256"] = file_sha256(image_path)
    else:
        index = 0 if ref_frame is None else ref_frame
        image = source.read(index)
        where = f"frame {index} of {source.path}"
        ref = Reference("frame", frame=index, image=image)
        ref.describe["frame"] = index
        ref.content["frame"] = index
    h, w = image.shape[:2]

    if ref_mask:
        mask = load_mask(ref_mask)
        if mask.shape != (h, w):
            raise SettingError(f"{{ref_mask}} {ref_mask} is {mask.shape[1]}x{mask.shape[0]} but {where} is {w}x{h}",
                               "ref_mask")
        ref.masks = {1: check_reference_mask(mask, ref_mask)}
        ref.describe["mask"] = str(ref_mask)
        ref.content["mask_sha256"] = file_sha256(ref_mask)
    elif ref_labels:
        labels = load_label_map(ref_labels)
        if labels.shape != (h, w):
            raise SettingError(f"{{ref_labels}} {ref_labels} is {labels.shape[1]}x{labels.shape[0]} but {where} "
                               f"is {w}x{h}", "ref_labels")
        ids = [int(i) for i in np.unique(labels) if i not in (0, 255)]
        if not ids:
            raise SettingError(f"{{ref_labels}} {ref_labels} holds no object (ids 1..254; 0 is background, 255 void)",
                               "ref_labels")
        if max(ids) > 254:
            raise SettingError(f"{{ref_labels}} {ref_labels} has object id {max(ids)}; a palette PNG holds ids 1..254",
                               "ref_labels")
        ref.masks = {i: labels == i for i in ids}
        ref.labels = True
        ref.describe["labels"] = str(ref_labels)
        ref.content["labels_sha256"] = file_sha256(ref_labels)
    elif ref_point:
        _check_inside(ref_point, w, h, 0, where)
        ref.points = [tuple(p) for p in ref_point]
        ref.describe["points"] = ref.content["points"] = [list(p) for p in ref.points]
    else:
        _check_inside([ref_box[:2], ref_box[2:]], w, h, 1, where)
        ref.box = tuple(ref_box)
        ref.describe["box"] = ref.content["box"] = list(ref.box)
    return ref
