"""Tiny FSS-1000 and COCO-20i datasets in the official layouts, drawn with shapes, and the official
GF-SAM loaders / evaluation loaded from the source snapshot (/work/.mirror) for parity tests."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np
import pytest
from PIL import Image

GFSAM_MIRROR = Path("/work/.mirror/ANDYZAQ+GF-SAM/repo")


def write_fss(root: Path, classes: Sequence[str], images_per_class: int = 10, size=(20, 24)) -> Path:
    """FSS-1000/data/<class>/<N>.jpg + <N>.png (0/255) for N = 1..images_per_class; returns FSS-1000."""
    rng = np.random.default_rng(1)
    h, w = size
    for c, name in enumerate(classes):
        folder = root / "data" / name
        folder.mkdir(parents=True)
        for n in range(1, images_per_class + 1):
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            centre = (int(rng.integers(6, w - 6)), int(rng.integers(6, h - 6)))
            if c % 2:
                cv2.circle(mask, centre, 4 + n % 3, 255, -1)
            else:
                cv2.rectangle(mask, (centre[0] - 5, centre[1] - 3), (centre[0] + 4, centre[1] + 3), 255, -1)
            image[mask > 0] = (200, 40 + 50 * c, 90)
            Image.fromarray(image).save(folder / f"{n}.jpg", quality=95)
            Image.fromarray(mask).save(folder / f"{n}.png")
    return root


def write_split(path: Path, classes: Sequence[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(c + newline for c in classes).encode())
    return path


def write_coco(root: Path, fold: int = 0, n_images: int = 6, size=(24, 32)) -> Dict[int, List[str]]:
    """COCO2014/val2014/*.jpg, annotations/val2014/*.png (class + 1 per pixel) and splits/val/fold<k>.pkl
    (all 80 classes as keys, the fold's 20 listed, each in two images); returns the split."""
    rng = np.random.default_rng(2)
    h, w = size
    fold_classes = [fold + 4 * v for v in range(20)]
    split: Dict[int, List[str]] = {c: [] for c in range(80)}
    (root / "val2014").mkdir(parents=True)
    (root / "annotations" / "val2014").mkdir(parents=True)
    for j in range(n_images):
        name = f"val2014/COCO_val2014_{100 + 7 * j:012d}.jpg"
        image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        labels = np.zeros((h, w), np.uint8)
        mine = [c for k, c in enumerate(fold_classes) if k % 3 == j % 3]
        for slot, c in enumerate(mine):
            y, x = 2 + (slot // 4) * 8, 2 + (slot % 4) * 7
            labels[y:y + 5, x:x + 5] = c + 1
            image[y:y + 5, x:x + 5] = (3 * c, 255 - 3 * c, 128)
            split[c].append(name)
        labels[0, :] = 255  # an unlabelled border, as COCO's masks have
        Image.fromarray(image).save(root / name, quality=95)
        Image.fromarray(labels).save(root / "annotations" / name.replace(".jpg", ".png"))
    for c in split:
        rng.shuffle(split[c])  # the lists' order matters to the draws: not sorted
    (root / "splits" / "val").mkdir(parents=True)
    with open(root / "splits" / "val" / f"fold{fold}.pkl", "wb") as f:
        pickle.dump(split, f)
    return split


def mirror_file(path: str) -> bytes:
    """A file of the official GF-SAM snapshot; the test skips when the snapshot is absent."""
    if not GFSAM_MIRROR.exists():
        pytest.skip(f"official GF-SAM source snapshot not found at {GFSAM_MIRROR}")
    done = subprocess.run(["git", "-C", str(GFSAM_MIRROR), "show", f"HEAD:{path}"], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"{path} not in the GF-SAM snapshot: {done.stderr.decode().strip()}")
    return done.stdout


def official_module(tmp_path: Path, path: str, name: str):
    """Load one official module file (e.g. matcher/data/fss.py) on its own, outside its package."""
    target = tmp_path / f"{name}.py"
    target.write_bytes(mirror_file(path))
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_logger(tmp_path: Path, monkeypatch):
    """matcher/common/logger.py with tensorboardX stubbed and `.cuda()` a no-op (CPU only here)."""
    import torch

    stub = types.ModuleType("tensorboardX")
    stub.SummaryWriter = object
    monkeypatch.setitem(sys.modules, "tensorboardX", stub)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=True)
    return official_module(tmp_path, "matcher/common/logger.py", "gfsam_official_logger")
