"""Few-shot segmentation benchmarks: FSS-1000 and COCO-20i, their class splits and their episodes.

An episode is one query image of a class with `shots` support images of the same class. The
episode lists are drawn exactly as the official loaders of HSNet / Matcher / GF-SAM draw them
(``matcher/data/fss.py`` and ``matcher/data/coco.py``), which their evaluation seeds with
``np.random.seed(0)`` before the first episode, so that the published numbers carry over:

* FSS-1000 (test split, 240 classes): every ``*.jpg`` of every class is a query, classes in
  sorted order and files in string order (``1.jpg, 10.jpg, 2.jpg, ...``); each support is
  ``choice(range(1, 11))`` of the query's folder, drawn again while it is the query itself (two
  supports of one episode may be the same image, as in the original).
* COCO-20i (fold k, 1000 episodes): the fold's 20 classes are ``k, k + 4, ..., k + 76``; each
  episode draws a class, a query among the images listed for it, and supports among them again
  while equal to the query.

Here the draws come from a ``np.random.RandomState(seed)`` of the episode list's own, never the
global numpy state, with the same calls, so they consume the stream as the original does.

The class lists are the benchmark's definition and ship with the toolkit (``eval/splits``): the
FSS-1000 test split (the official ``splits/test.txt``), and the COCO-20i val lists of images per
class as JSON, converted from the official ``splits/val/fold*.pkl`` by :func:`coco_split_from_pickle`
(a pickle is read with a loader that builds only plain containers, never calls anything); the
user's own pickles are read the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from persam.errors import InputError

from eval.datasets import DatasetError

PathLike = Union[str, Path]

__all__ = ["SPLITS_DIR", "FSS_TEST_SPLIT", "COCO_FOLDS", "COCO_EPISODES", "Episode", "FSS1000", "COCO20i",
           "COCO_CLASS_NAMES", "read_class_list", "coco_fold_classes", "split_sha256",
           "split_file_sha256", "coco_split_from_pickle", "read_coco_split", "names_in_line"]

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
FSS_TEST_SPLIT = SPLITS_DIR / "fss1000_test.txt"
COCO_FOLDS = 4
COCO_CLASSES = 80
COCO_EPISODES = 1000
COCO_IMAGE = "val2014/COCO_val2014_{:012d}.jpg"
FSS_SUPPORT_IDS = range(1, 11)  # the official loader draws supports among 1.jpg .. 10.jpg
# COCO's 80 object categories in category-id order: class c (0..79) has pixel value c + 1 in the masks
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Episode:
    """One query with its supports. `class_index` is the class's id in the benchmark's meter (its
    position in the sorted split for FSS-1000, the COCO class 0..79 for COCO-20i); `name` is the
    prediction's path under pred/ without '.png'."""

    index: int
    class_name: str
    class_index: int
    query: Path
    supports: Tuple[Path, ...]
    name: str


def names_in_line(names: Sequence[str], first: int = 5) -> str:
    """'a, b, c, d, e (and 7 more)': a long list of names for a one-line message."""
    shown = ", ".join(str(n) for n in names[:first])
    return shown + (f" (and {len(names) - first} more)" if len(names) > first else "")


def read_class_list(path: PathLike) -> List[str]:
    """The class names of a split file, one a line (CRLF or LF; blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the class list {path} ({getattr(exc, 'strerror', None) or exc})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"class list {path} names no class")
    return names


def split_sha256(names: Sequence[str]) -> str:
    """sha256 of a class list as the episodes see it (sorted names, one a line)."""
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8")).hexdigest()


def split_file_sha256(images: Dict[int, List[str]]) -> str:
    """sha256 of a COCO-20i split as the episodes see it (each class's images, in order)."""
    text = json.dumps({str(c): images[c] for c in sorted(images)}, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- #
# FSS-1000
# --------------------------------------------------------------------------- #


class FSS1000:
    """FSS-1000 as distributed: a folder per class holding ``N.jpg`` and its mask ``N.png`` (0/255).

    `root` is the folder of class folders, or a folder holding it as ``data/`` (the official
    ``FSS-1000/data`` layout). `split` is a class list file (default: the test split shipped here,
    240 classes). Classes of the split that `root` lacks are refused in one line."""

    def __init__(self, root: PathLike, split: Optional[PathLike] = None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"FSS-1000 folder not found: {root}")
        self.root = root / "data" if (root / "data").is_dir() else root
        self.split_file = Path(split) if split is not None else FSS_TEST_SPLIT
        self.classes = sorted(read_class_list(self.split_file))  # the official loader sorts them
        missing = [c for c in self.classes if not (self.root / c).is_dir()]
        if missing:
            raise DatasetError(f"FSS-1000 {self.root}: {len(missing)} of the {len(self.classes)} classes of "
                               f"{self.split_file} are missing: {names_in_line(missing)}")

    def queries(self, name: str) -> List[Path]:
        """The class's query images in the official order: the folder's '*.jpg' names, string-sorted."""
        folder = self.root / name
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        return [folder / n for n in names if n.split(".")[1:2] == ["jpg"]]

    def episodes(self, shots: int = 1, seed: int = 0) -> List[Episode]:
        """Every query of every class with `shots` supports, drawn as the official loader draws them.
        DatasetError naming the first missing support or mask file of the list."""
        rng = np.random.RandomState(seed)
        episodes: List[Episode] = []
        for class_index, name in enumerate(self.classes):
            for query in self.queries(name):
                supports: List[Path] = []
                while len(supports) < shots:
                    support = query.parent / f"{rng.choice(FSS_SUPPORT_IDS, 1, replace=False)[0]}.jpg"
                    if support != query:
                        supports.append(support)
                episodes.append(Episode(len(episodes), name, class_index, query, tuple(supports),
                                        f"{name}/{query.stem}"))
        self._check_files(episodes)
        return episodes

    def _check_files(self, episodes: Sequence[Episode]) -> None:
        if not episodes:
            raise DatasetError(f"FSS-1000 {self.root}: the classes of {self.split_file} hold no .jpg image")
        needed = {p for e in episodes for p in (e.query, *e.supports)}
        missing = sorted(str(p) for image in needed for p in (image, self.mask_path(image)) if not p.is_file())
        if missing:
            raise DatasetError(f"FSS-1000 {self.root}: {len(missing)} file(s) the episodes need are missing: "
                               f"{names_in_line(missing, 3)}")

    @staticmethod
    def mask_path(image: Path) -> Path:
        return image.with_suffix(".png")

    def mask(self, image: Path, episode: Episode) -> np.ndarray:
        """The image's mask (H x W bool): grey >= 128, as the official loader thresholds it."""
        return read_grey(self.mask_path(image)) >= 128


# --------------------------------------------------------------------------- #
# COCO-20i
# --------------------------------------------------------------------------- #


def coco_fold_classes(fold: int) -> List[int]:
    """The 20 COCO classes (0..79) of fold `fold`'s test set: fold, fold + 4, ..., fold + 76."""
    if fold not in range(COCO_FOLDS):
        raise InputError(f"COCO-20i fold must be 0..{COCO_FOLDS - 1}, not {fold}")
    return [fold + COCO_FOLDS * v for v in range(COCO_CLASSES // COCO_FOLDS)]


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numbers only: any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")


def coco_split_from_pickle(path: PathLike) -> Dict[int, List[str]]:
    """The images of each class of an official ``splits/val/fold*.pkl`` (class -> image paths such as
    'val2014/COCO_val2014_000000429717.jpg'), read without running any code from the file."""
    path = Path(path)
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise InputError(f"cannot read the COCO-20i split {path} ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(k, int) and isinstance(v, list) and
                                             all(isinstance(n, str) for n in v) for k, v in data.items()):
        raise InputError(f"COCO-20i split {path} is not a mapping of class ids to lists of image paths")
    return data


def read_coco_split(fold: int, path: Optional[PathLike] = None) -> Dict[int, List[str]]:
    """The images of each class of `fold` (class -> image paths relative to COCO2014, official order):
    from `path` (our JSON or an official pickle), else the shipped ``coco20i_val_fold<k>.json``."""
    path = Path(path) if path is not None else SPLITS_DIR / f"coco20i_val_fold{fold}.json"
    if path.suffix == ".pkl":
        split = coco_split_from_pickle(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            split = {int(k): [COCO_IMAGE.format(int(i)) for i in ids] for k, ids in data["classes"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"cannot read the COCO-20i split {path} ({exc})") from None
    empty = [c for c in coco_fold_classes(fold) if not split.get(c)]
    if empty:
        raise InputError(f"COCO-20i split {path} lists no image for class(es) {names_in_line(empty)} of fold {fold}")
    return split


def coco_split_to_json(split: Dict[int, List[str]], fold: int, source: str) -> str:
    """The compact JSON shipped in eval/splits: the fold's classes, each a list of COCO image ids."""
    classes = {}
    for c in coco_fold_classes(fold):
        ids = []
        for name in split[c]:
            stem = name.rsplit("_", 1)[-1]
            if COCO_IMAGE.format(int(stem[:-4])) != name:
                raise InputError(f"unexpected COCO image path {name!r} in {source}")
            ids.append(int(stem[:-4]))
        classes[str(c)] = ids
    data = {"benchmark": "coco20i", "fold": fold, "source": source, "image": COCO_IMAGE, "classes": classes}
    return json.dumps(data, separators=(",", ":")) + "\n"


class COCO20i:
    """COCO-20i in the official layout: `root` (COCO2014) holds ``val2014/*.jpg`` and the class-id
    masks ``annotations/val2014/*.png`` (pixel value = class + 1)."""

    def __init__(self, root: PathLike, fold: int, split: Optional[PathLike] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"COCO2014 folder not found: {self.root}")
        for folder in (self.root / "val2014", self.root / "annotations" / "val2014"):
            if not folder.is_dir():
                raise DatasetError(f"COCO-20i {self.root}: no {folder.relative_to(self.root)}/ folder (COCO2014 holds "
                                   f"val2014/*.jpg and the class masks annotations/val2014/*.png)")
        self.fold = fold
        self.class_ids = coco_fold_classes(fold)
        self.images = read_coco_split(fold, split)
        self.split_file = split

    def episodes(self, shots: int = 1, seed: int = 0, count: int = COCO_EPISODES) -> List[Episode]:
        """`count` episodes drawn as the official loader draws them."""
        rng = np.random.RandomState(seed)
        episodes: List[Episode] = []
        for index in range(count):
            class_id = int(rng.choice(self.class_ids, 1, replace=False)[0])
            names = self.images[class_id]
            query = names[rng.choice(len(names), 1, replace=False)[0]]
            supports: List[str] = []
            while len(supports) < shots:
                support = names[rng.choice(len(names), 1, replace=False)[0]]
                if support != query:
                    supports.append(support)
            episodes.append(Episode(index, str(class_id), class_id, self.root / query,
                                    tuple(self.root / s for s in supports),
                                    f"fold{self.fold}/{index:04d}_{Path(query).stem}"))
        self._check_files(episodes)
        return episodes

    def _check_files(self, episodes: Sequence[Episode]) -> None:
        needed = {p for e in episodes for p in (e.query, *e.supports)}
        missing = sorted(str(p) for image in needed for p in (image, self.mask_path(image)) if not p.is_file())
        if missing:
            raise DatasetError(f"COCO-20i {self.root}: {len(missing)} file(s) the episodes need are missing: "
                               f"{names_in_line(missing, 3)}")

    def mask_path(self, image: Path) -> Path:
        relative = image.relative_to(self.root)
        return self.root / "annotations" / relative.with_suffix(".png")

    def mask(self, image: Path, episode: Episode) -> np.ndarray:
        """The episode class's mask of `image` (H x W bool)."""
        return read_grey(self.mask_path(image), mode=None) == episode.class_index + 1


def read_grey(path: Path, mode: Optional[str] = "L") -> np.ndarray:
    """A mask file's values (converted to `mode`, or as stored), InputError naming a bad file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if mode else img)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the mask {path} ({exc})") from None
