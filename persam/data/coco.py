"""COCO instances JSON of what persam found, for dataset tools (`--format coco`).

One category (the concept's name), one image entry per segmented image (or video frame) and
one annotation per object found, with its mask as compressed RLE (pycocotools), its box
(x, y, w, h: the mask's tight box), its area (mask pixels) and its score (the decoder's
predicted IoU).  Masks decoded from the file (``COCO.annToMask``) equal the PNG masks:
with one object per image the mask PNG's foreground; with ``--multi`` the label PNG's
object k (the pixels that hold label k, in the order of the record's ``objects``).

    images:      [{"id", "file_name" (the image as given), "width", "height", "persam_name", "mask_file"}]
    annotations: [{"id", "image_id", "category_id": 1, "segmentation": {"size", "counts"}, "area", "bbox",
                   "iscrowd": 0, "score"}]
    categories:  [{"id": 1, "name": NAME, "supercategory": "object"}]

:func:`results_to_coco` builds it from a results.json (segment / apply); :func:`track_to_coco`
from a `persam track` folder (frames as images, ``track_id`` per object; persam.runs.track writes it);
:func:`coco_dataset` from any images and masks; :func:`write_coco` writes it atomically.
pycocotools is an optional extra: ``pip install 'persam[coco]'``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from persam.errors import SettingError
from persam.data.io import atomic_write_text

__all__ = ["COCO_FILE", "CocoImage", "coco_dataset", "encode_rle", "reference_category", "require_pycocotools",
           "results_to_coco", "track_to_coco", "write_coco"]

COCO_FILE = "coco.json"
INSTALL_HINT = "pip install 'persam[coco]'"


def reference_category(path) -> str:
    """The category a reference image names by default: its file name without the extension, or,
    where that is a number (a frame or photo index: PerSeg's Images/cat/00.jpg, 0001-2.png), the
    name of its folder (cat).  The file name where there is no folder (the root)."""
    stem = Path(path).stem
    if re.fullmatch(r"\d+([._-]\d+)*", stem):
        folder = Path(os.path.abspath(path)).parent.name  # "00.jpg" and "../00.jpg" too, links not followed
        if folder:
            return folder
    return stem


def require_pycocotools():
    """pycocotools.mask; InputError saying how to install it when missing."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise SettingError(f"{{format}} coco needs pycocotools, which is not installed ({exc}); install it with "
                           f"{INSTALL_HINT} (or pip install pycocotools)", "format") from None
    return mask_utils


@dataclass
class CocoImage:
    """One image (or frame) and the objects found in it: (H x W bool mask, score) each, or
    (mask, score, more keys of its annotation: e.g. {"track_id": 2})."""

    file_name: str
    width: int
    height: int
    objects: Sequence[tuple] = ()
    extra: Dict[str, object] = field(default_factory=dict)  # more keys of the image entry


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of an H x W mask, JSON-ready ({"size": [H, W], "counts": str})."""
    mask_utils = require_pycocotools()
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=bool).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_dataset(images: Iterable[CocoImage], category: str, description: str = "persam") -> dict:
    """The COCO instances dictionary of `images`, all of one `category`."""
    mask_utils = require_pycocotools()
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        entries.append({"id": image_id, "file_name": str(image.file_name), "width": int(image.width),
                        "height": int(image.height), **image.extra})
        for obj in image.objects:
            mask, score = obj[0], obj[1]
            extra = dict(obj[2]) if len(obj) > 2 else {}
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (image.height, image.width):
                raise ValueError(f"{image.file_name}: mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                                 f"{image.width}x{image.height}")
            if not mask.any():
                continue
            rle = encode_rle(mask)
            compressed = dict(rle, counts=rle["counts"].encode("ascii"))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle,
                "area": int(mask_utils.area(compressed)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(compressed)],
                "iscrowd": 0,
                "score": round(float(score), 5) if score is not None and np.isfinite(score) else None,
                **extra,
            })
    return {
        "info": {"description": description},
        "licenses": [],
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": str(category), "supercategory": "object"}],
    }


def write_coco(path, dataset: dict) -> Path:
    """Write a COCO dictionary atomically as strict JSON."""
    return atomic_write_text(path, json.dumps(dataset, allow_nan=False, separators=(",", ":")) + "\n")


def _made_outputs(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("outputs"), dict)
            and record.get("status") != "error" and isinstance(record.get("size"), list))


def results_to_coco(out_dir, data: dict, category: Optional[str] = None) -> dict:
    """The COCO dictionary of a results.json (`data`, as written into `out_dir`): every image whose
    record was made with the run's key (segmented now, or done earlier), its objects read back from
    its mask PNG.  `category`: the concept's name (default: the header's ``concept_name``)."""
    from persam.data.io import load_label_map, load_mask

    out_dir = Path(out_dir)
    multi = bool(data.get("multi"))
    category = category or data.get("concept_name") or "object"
    images: List[CocoImage] = []
    for record in data.get("images", []):
        if record.get("key") != data.get("key") or not _made_outputs(record):
            continue
        width, height = (int(v) for v in record["size"])
        mask_file = record["outputs"]["mask"]
        objects: List[Tuple[np.ndarray, float]] = []
        if multi:
            labels = load_label_map(out_dir / mask_file, (height, width))
            for k, obj in enumerate(record.get("objects") or [], start=1):
                objects.append((labels == k, obj.get("iou_score")))
        elif record.get("found"):
            objects.append((load_mask(out_dir / mask_file, (height, width)), record.get("iou_score")))
        images.append(CocoImage(record["image"], width, height, objects,
                                {"persam_name": record["name"], "mask_file": mask_file}))
    return coco_dataset(images, category)


# --------------------------------------------------------------------------------------------
# persam track: frames as images


def track_to_coco(out_dir, data: dict, category: str, frame_files: Sequence = ()) -> dict:
    """The COCO dictionary of a `persam track` results.json (`data`, as written into `out_dir`):
    one image per processed frame (``file_name``: the frame's file for a folder of frames, else
    ``VIDEO#INDEX``; ``frame_index``), one annotation per object found in it (``track_id``: the
    object's id), its mask read back from the frame's mask PNG."""
    from persam.data.io import load_label_map

    out_dir = Path(out_dir)
    width, height = (int(v) for v in data["size"])
    video = str(data.get("video"))
    images = []
    for record in sorted(data.get("frames", []), key=lambda r: r["index"]):
        index = int(record["index"])
        labels = load_label_map(out_dir / record["mask"], (height, width))
        if not data.get("palette_masks"):
            labels = (labels > 0).astype(np.int32)  # a 0/255 mask: object 1
        objects = [(labels == int(o["id"]), o.get("iou_score"), {"track_id": int(o["id"])})
                   for o in record.get("objects", []) if o.get("found")]
        name = str(frame_files[index]) if index < len(frame_files) else f"{video}#{index}"
        images.append(CocoImage(name, width, height, objects,
                                {"frame_index": index, "mask_file": record["mask"], "video": video}))
    return coco_dataset(images, category)
