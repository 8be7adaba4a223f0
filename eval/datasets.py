"""Dataset readers for PerSeg, DAVIS (2017 and 2016 forms) and plain image/mask folders.

Images and masks are always paired by file name stem, never by sorted position.
By default (``strict=True``) a missing or extra file raises :class:`DatasetError`
naming it; with ``strict=False`` the problem is recorded in ``.problems`` and the
file is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from persam.errors import InputError
from persam.data.io import load_label_map

PathLike = Union[str, Path]
Pair = Tuple[str, Path, Path]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_EXTS = frozenset({".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg"})

__all__ = [
    "DatasetError",
    "IMAGE_EXTS",
    "MASK_EXTS",
    "PerSegDataset",
    "DavisDataset",
    "PairFolderDataset",
]


class DatasetError(InputError):
    """A dataset whose layout is broken: missing folders, missing or extra files."""


class SplitFileError(DatasetError):
    """The DAVIS ImageSets split file is missing (``.split_file``, ``.split``, ``.year``)."""

    def __init__(self, split_file: Path, split: str, year: str):
        super().__init__(
            f"DAVIS split file not found: {split_file} (no split {split!r} for year {year}; "
            f"split=None takes every sequence folder)"
        )
        self.split_file, self.split, self.year = split_file, split, year


def natural_key(name: str) -> List[Union[int, str]]:
    """Sort key that orders embedded numbers numerically ("2" before "10")."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


class _Reporter:
    """Raises or records dataset problems depending on ``strict``."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: List[str] = []

    def __call__(self, message: str) -> None:
        if self.strict:
            raise DatasetError(message)
        self.problems.append(message)


def _index_folder(folder: Path, exts: frozenset, report: _Reporter, what: str) -> Dict[str, Path]:
    """Map file stem -> path for the files of ``folder`` with one of ``exts``; duplicates reported."""
    index: Dict[str, Path] = {}
    duplicates = set()
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in exts:
            continue
        if path.stem in index:
            report(f"{what}: two files named {path.stem!r}: {index[path.stem].name} and {path.name}")
            duplicates.add(path.stem)
            continue
        index[path.stem] = path
    for stem in duplicates:
        index.pop(stem, None)
    return index


def _subfolders(folder: Path) -> List[str]:
    return sorted(
        (p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))),
        key=natural_key,
    )


def _pair_by_stem(
    images: Dict[str, Path], masks: Dict[str, Path], mask_folder: Path, report: _Reporter, what: str
) -> List[Pair]:
    """Pair images and masks by stem; report images without mask and masks without image."""
    pairs: List[Pair] = []
    for name in sorted(set(images) | set(masks), key=natural_key):
        if name not in masks:
            report(f"{what}: image {images[name]} has no mask (expected {mask_folder / (name + '.png')})")
        elif name not in images:
            report(f"{what}: mask {masks[name]} has no image")
        else:
            pairs.append((name, images[name], masks[name]))
    return pairs


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


# --------------------------------------------------------------------------- #
# PerSeg
# --------------------------------------------------------------------------- #


class PerSegDataset:
    """PerSeg: ``Images/<class>/*.jpg`` with ``Annotations/<class>/*.png``.

    ``root`` is the folder holding ``Images`` and ``Annotations`` (the official
    zip's ``data 3``) or its parent. The image named ``reference`` (stem) of each
    class is the one-shot reference; every other image is a test image.
    """

    def __init__(self, root: PathLike, reference: str = "00", strict: bool = True):
        self.root = self._find_root(Path(root))
        self.reference_name = reference
        self._report = _Reporter(strict)
        self.problems = self._report.problems
        self._classes: Dict[str, Tuple[Tuple[Path, Path], List[Pair]]] = {}
        self._scan()

    @staticmethod
    def _find_root(root: Path) -> Path:
        for candidate in (root, root / "data 3"):
            if (candidate / "Images").is_dir() and (candidate / "Annotations").is_dir():
                return candidate
        raise DatasetError(f"PerSeg root {root} has no Images/ and Annotations/ folders (nor a 'data 3' folder holding them)")

    def _scan(self) -> None:
        images_root, masks_root = self.root / "Images", self.root / "Annotations"
        image_classes, mask_classes = _subfolders(images_root), _subfolders(masks_root)
        for name in sorted(set(mask_classes) - set(image_classes), key=natural_key):
            self._report(f"class {name}: {masks_root / name} has no matching image folder {images_root / name}")
        for name in image_classes:
            what = f"class {name}"
            if name not in mask_classes:
                self._report(f"{what}: image folder {images_root / name} has no mask folder {masks_root / name}")
                continue
            images = _index_folder(images_root / name, IMAGE_EXTS, self._report, what)
            masks = _index_folder(masks_root / name, MASK_EXTS, self._report, what)
            pairs = _pair_by_stem(images, masks, masks_root / name, self._report, what)
            reference = [p for p in pairs if p[0] == self.reference_name]
            if not reference:
                if self.reference_name in images or self.reference_name in masks:
                    continue  # its missing half was reported above; the class is unusable
                self._report(f"{what}: no reference image {self.reference_name!r} in {images_root / name}")
                continue
            tests = [p for p in pairs if p[0] != self.reference_name]
            if not tests:
                self._report(f"{what}: no test images besides the reference in {images_root / name}")
                continue
            self._classes[name] = ((reference[0][1], reference[0][2]), tests)

    def _entry(self, name: str) -> Tuple[Tuple[Path, Path], List[Pair]]:
        try:
            return self._classes[name]
        except KeyError:
            raise DatasetError(f"PerSeg {self.root}: unknown or skipped class {name!r}") from None

    def classes(self) -> List[str]:
        """Usable class names, sorted."""
        return list(self._classes)

    def reference(self, name: str) -> Tuple[Path, Path]:
        """(image_path, mask_path) of the class's reference image."""
        return self._entry(name)[0]

    def test_pairs(self, name: str) -> List[Pair]:
        """(name, image_path, mask_path) of every test image of the class, reference excluded."""
        return list(self._entry(name)[1])

    def __len__(self) -> int:
        return len(self._classes)


# --------------------------------------------------------------------------- #
# DAVIS
# --------------------------------------------------------------------------- #

Frame = Tuple[str, Optional[Path], Optional[Path]]


class DavisDataset:
    """DAVIS 2017 semi-supervised layout.

    ``root/JPEGImages/<resolution>/<seq>/*.jpg``, ``root/Annotations/<resolution>/<seq>/*.png``
    (palette ids) and ``root/ImageSets/<year>/<split>.txt``; ``root`` may also be the
    parent of an unpacked ``DAVIS`` folder. ``split=None`` takes every sequence
    folder. Use :meth:`from_2016` for the DAVIS 2016 form (0/255 grayscale masks).
    """

    def __init__(
        self,
        root: PathLike,
        year: str = "2017",
        split: Optional[str] = "val",
        resolution: str = "480p",
        strict: bool = True,
    ):
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "DAVIS" / "JPEGImages").is_dir():
            root = root / "DAVIS"
        self.root: Optional[Path] = root
        images_root = _require_dir(root / "JPEGImages" / resolution, "DAVIS image folder")
        masks_root = _require_dir(root / "Annotations" / resolution, "DAVIS annotation folder")
        if split is None:
            names = None
        else:
            split_file = root / "ImageSets" / str(year) / f"{split}.txt"
            if not split_file.is_file():
                raise SplitFileError(split_file, str(split), str(year))
            names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        self._setup(images_root, masks_root, names, strict, form="2017")

    @classmethod
    def from_2016(
        cls,
        masks_root: PathLike,
        images_root: Optional[PathLike] = None,
        sequences: Optional[Sequence[str]] = None,
        strict: bool = True,
    ) -> "DavisDataset":
        """DAVIS 2016 form: ``masks_root/<seq>/*.png`` grayscale 0/255 masks (one object).

        ``images_root/<seq>/*.jpg`` holds the frames; without it, frames are listed
        from the masks and their image path is ``None``. Label maps come out 0/1.
        """
        self = cls.__new__(cls)
        self.root = None
        masks = _require_dir(Path(masks_root), "DAVIS 2016 mask folder")
        images = _require_dir(Path(images_root), "DAVIS 2016 image folder") if images_root is not None else None
        self._setup(images, masks, list(sequences) if sequences is not None else None, strict, form="2016")
        return self

    def _setup(
        self,
        images_root: Optional[Path],
        masks_root: Path,
        names: Optional[List[str]],
        strict: bool,
        form: str,
    ) -> None:
        self.images_root, self.masks_root, self.form = images_root, masks_root, form
        self._report = _Reporter(strict)
        self.problems = self._report.problems
        if names is None:
            names = _subfolders(masks_root)
        self._frames: Dict[str, List[Frame]] = {}
        for seq in names:
            frames = self._scan_sequence(seq)
            if frames is not None:
                self._frames[seq] = frames

    def _scan_sequence(self, seq: str) -> Optional[List[Frame]]:
        what = f"sequence {seq}"
        mask_dir = self.masks_root / seq
        if not mask_dir.is_dir():
            self._report(f"{what}: annotation folder {mask_dir} not found")
            return None
        masks = _index_folder(mask_dir, MASK_EXTS, self._report, what)
        if self.images_root is None:
            frames: List[Frame] = [(name, None, path) for name, path in masks.items()]
        else:
            image_dir = self.images_root / seq
            if not image_dir.is_dir():
                self._report(f"{what}: image folder {image_dir} not found")
                return None
            images = _index_folder(image_dir, IMAGE_EXTS, self._report, what)
            for name in sorted(set(masks) - set(images), key=natural_key):
                self._report(f"{what}: mask {masks[name]} has no image")
            frames = [(name, images[name], masks.get(name)) for name in images]
        if not frames:
            self._report(f"{what}: no frames found")
            return None
        if frames[0][2] is None:
            self._report(f"{what}: first frame {frames[0][0]} has no annotation (expected in {mask_dir})")
            return None
        return frames

    def _entry(self, seq: str) -> List[Frame]:
        try:
            return self._frames[seq]
        except KeyError:
            raise DatasetError(f"DAVIS {self.masks_root}: unknown or skipped sequence {seq!r}") from None

    def sequences(self) -> List[str]:
        """Usable sequence names, in split-file (or folder) order."""
        return list(self._frames)

    def frames(self, seq: str) -> List[Frame]:
        """(name, image_path, mask_path or None) of every frame, in frame order."""
        return list(self._entry(seq))

    def label_map(self, seq: str, name: str) -> np.ndarray:
        """The H x W int object-id map of frame ``name`` (0/1 for the 2016 form)."""
        for frame_name, _, mask_path in self._entry(seq):
            if frame_name == name:
                if mask_path is None:
                    raise DatasetError(f"sequence {seq}: frame {name} has no annotation")
                return load_label_map(mask_path)
        raise DatasetError(f"sequence {seq}: no frame named {name!r}")

    def object_ids(self, seq: str) -> List[int]:
        """Object ids present in the first frame's annotation (0 and void 255 excluded)."""
        first = self._entry(seq)[0]
        ids = np.unique(load_label_map(first[2]))
        return [int(i) for i in ids if i not in (0, 255)]

    def __len__(self) -> int:
        return len(self._frames)


# --------------------------------------------------------------------------- #
# A plain folder of pairs
# --------------------------------------------------------------------------- #


class PairFolderDataset:
    """Images in one folder and masks in another, paired by file name stem."""

    def __init__(self, images_dir: PathLike, masks_dir: PathLike, strict: bool = True):
        self.images_dir = _require_dir(Path(images_dir), "image folder")
        self.masks_dir = _require_dir(Path(masks_dir), "mask folder")
        self._report = _Reporter(strict)
        self.problems = self._report.problems
        what = f"folder {self.images_dir}"
        images = _index_folder(self.images_dir, IMAGE_EXTS, self._report, what)
        masks = _index_folder(self.masks_dir, MASK_EXTS, self._report, what)
        self._pairs = _pair_by_stem(images, masks, self.masks_dir, self._report, what)

    def pairs(self) -> List[Pair]:
        """(name, image_path, mask_path) for every matched pair, in name order."""
        return list(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(list(self._pairs))
