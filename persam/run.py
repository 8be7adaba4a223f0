"""Batch runner: find a learned concept in many target images and write the results.

For every target image (files, folders of images, glob patterns; see persam.sources)
the image is encoded once and segmented (one object, or several with ``multi``); into the
output folder go, each written atomically:

    <name>.png              the mask, 0/255 (with ``multi``: a palette label PNG, object k = k)
    <name>_overlay.jpg      the image with the mask(s), prompt points and box(es)
    <name>_similarity.png   the target-similarity heat map (with ``save_similarity``)
    results.json            one record per image, rewritten after every image

The output folder is shared with the user and with later runs; :class:`OutputFolder` keeps
four promises about it:

* **Nothing of the user's is replaced.**  results.json lists (``files``) every file persam
  wrote into the folder.  A file the run would write that exists but is not listed is
  refused, and so is a target image inside the folder.  A file is listed *before* it is
  written (results.json is rewritten first), so a run killed in between leaves only listed
  files behind, and the next run may replace them.
* **Results are never mixed.**  Every record carries the key of what made its mask
  (:func:`settings_key`: the reference or concept by content, the method and its settings,
  the model and the checkpoint's sha256).  An image is skipped as done only when its record
  has the run's key, the same image content and all its outputs (the content: the file's
  sha256, taken from the record without reading the file again when the record names the same
  path with the same size and modification time, ``image_stat``); an image done with another
  key is refused unless ``overwrite`` (which redoes it).  Records of images outside the run
  that were made with other settings are kept and named in the header (``other_keys``).
* **One run at a time.**  The folder is locked for the whole run (:func:`output_lock`).
* **Outputs never collide.**  Output names are chosen so that no two outputs of the run are
  the same file, and none is results.json or reference_mask.png (:func:`plan_targets`).

The work on a group of ``batch_size`` images is :func:`segment_targets` (load, encode, segment
with each decoder call made once for the group, encode the output files: nothing written) and
:func:`write_result` (each image's files, atomically); the Ray engine (persam.engine_ray) runs
the same :func:`segment_targets` on the files' bytes in its workers and hands the results to
:meth:`OutputFolder.add_result` on the driver.  Targets may be URIs (persam.sources.UriPath).

A target that is the reference image (same file or same content) is skipped and recorded as
such.  An image that cannot be loaded is reported and recorded as an error; the run goes on.
results.json is strict JSON (no NaN or Infinity).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from .io import InputError, atomic_write_bytes, atomic_write_text, encode_png
from .pipeline import Concept, Segmentation, decode_workers, each_on_one_thread, locate, segment_images
from .sources import IMAGE_EXTENSIONS, expand_targets  # re-exported: the expansion is persam.sources's

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): no folder lock
    fcntl = None

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOCK_FILE",
    "REFERENCE_MASK_FILE",
    "RESULTS_FILE",
    "ImageResult",
    "OutputFolder",
    "RunOptions",
    "Target",
    "expand_targets",
    "file_sha256",
    "output_lock",
    "plan_targets",
    "error_result",
    "load_target",
    "run_batch",
    "encode_loaded",
    "segment_loaded_images",
    "segment_targets",
    "settings_key",
    "write_result",
]

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "persam-results"
RESULTS_VERSION = 2  # 2: format, key, made_with, other_keys, files; records with key and image_sha256
REFERENCE_MASK_FILE = "reference_mask.png"  # written by `persam segment` from clicks or a box
LOCK_FILE = ".persam.lock"
UNRECORDED_KEY = "unrecorded"  # the key of records from a results.json written before keys existed
REFERENCE_IMAGE = "reference image"  # the skip reason of a target that is the reference image
MAX_LABELS = 255  # objects one 8-bit label PNG can hold (0 is background)
_OUTPUT_SUFFIXES = ("_overlay", "_similarity")  # a stem ending so could be another image's output


@dataclass
class RunOptions:
    multi: bool = False
    max_objects: int = 5
    min_similarity: Optional[float] = None
    save_similarity: bool = False
    overwrite: bool = False
    overlay_format: str = "jpg"  # "jpg" or "png"
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    info: Dict[str, object] = field(default_factory=dict)  # run settings recorded in results.json
    # What makes the masks besides the options above (the reference or concept by content, the
    # method and its settings, model type, checkpoint sha256, precision): part of the run's key.
    made_with: Dict[str, object] = field(default_factory=dict)
    reference_images: Sequence[Path] = ()  # a target that is one of these (file or content) is skipped
    extra_outputs: Sequence[str] = ()  # files the caller writes into the folder during the run
    # Images segmented together: on a CPU up to one per torch thread side by side, each on one thread
    # (persam.pipeline.each_on_one_thread); on a GPU each decoder call of the method is made once for
    # all of them (persam.pipeline.segment_images), and they are encoded together.
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 1 <= self.max_objects <= MAX_LABELS:
            raise ValueError(f"max_objects must be between 1 and {MAX_LABELS} (the label PNG holds {MAX_LABELS} "
                             f"objects), got {self.max_objects}")
        if self.overlay_format not in ("jpg", "png"):
            raise ValueError(f"overlay_format must be 'jpg' or 'png', got {self.overlay_format!r}")


@dataclass
class Target:
    path: Path
    name: str  # output file stem, unique within the run
    done: bool = False  # segmented by an earlier run with the same key; all outputs exist
    sha256: Optional[str] = None  # of the image file; None when it cannot be read
    skip_reason: Optional[str] = None  # why it is not segmented (the reference image)
    stat: Optional[List[int]] = None  # [size, mtime_ns] of the image file when planned (persam.sources.image_stat)

    @property
    def pending(self) -> bool:
        """To be segmented in this run."""
        return not self.done and self.skip_reason is None


def output_files(name: str, options: RunOptions) -> Dict[str, str]:
    files = {"mask": f"{name}.png", "overlay": f"{name}_overlay.{options.overlay_format}"}
    if options.save_similarity:
        files["similarity"] = f"{name}_similarity.png"
    return files


def _reserved_files(options: RunOptions) -> Set[str]:
    """Files of the run that no image's output may be (case-folded)."""
    return {f.casefold() for f in (RESULTS_FILE, REFERENCE_MASK_FILE, LOCK_FILE, *options.extra_outputs)}


def _safe_stem(stem: str, reserved: Set[str]) -> str:
    """`stem`, or `stem`_image where its outputs could be another file of the run.

    Outputs are NAME.png, NAME_overlay.EXT and NAME_similarity.png, so two different names
    only share an output file when one ends in _overlay or _similarity (x_overlay.png is both
    x_overlay's mask and x's PNG overlay); such a stem, and one whose outputs would be a
    reserved file (reference_mask.png, results.json), gets the suffix _image.  Case is
    ignored (case-insensitive file systems)."""
    folded = stem.casefold()
    possible = {f"{folded}.png", f"{folded}_overlay.jpg", f"{folded}_overlay.png", f"{folded}_similarity.png"}
    if folded.endswith(_OUTPUT_SUFFIXES) or possible & reserved:
        return f"{stem}_image"
    return stem


def _unique_names(
    paths: Sequence[Path],
    reserved: Set[str] = frozenset(),
    available: Callable[[str, int], bool] = lambda name, index: True,
) -> List[str]:
    """Output stems: the file stem, or parent_stem where stems collide, made safe (:func:`_safe_stem`),
    then a counter where a name is used already or not `available` for the path at that index."""
    stems = [_safe_stem(p.stem, reserved) for p in paths]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s.casefold()] = counts.get(s.casefold(), 0) + 1
    names, used = [], set()
    for index, (p, s) in enumerate(zip(paths, stems)):
        name = s if counts[s.casefold()] == 1 or not p.parent.name else _safe_stem(f"{p.parent.name}_{p.stem}", reserved)
        base, k = name, 2
        while name.casefold() in used or not available(name, index):
            name, k = f"{base}_{k}", k + 1
        used.add(name.casefold())
        names.append(name)
    return names


def _inside(path: Path, folder: Path) -> bool:
    """True when `path` lies in `folder` or below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return folder == path or folder in path.parents


# --------------------------------------------------------------------------------------------
# content hashes and the run's key


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, remembered for the process per (path, size, mtime), so that
    a big checkpoint is read once however often it is asked for."""
    p = Path(path).resolve()
    stat = p.stat()
    return _sha256_of(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    from sam.download import sha256_file

    return sha256_file(path)


def _image_sha256(path) -> Optional[str]:
    """sha256 of an image file, local or a URI (not remembered: there are many); None when it
    cannot be read (reported when it is loaded)."""
    from .sources import image_sha256

    return image_sha256(path)


def _as_image_path(p):
    """A local Path, or the UriPath of a URI (persam.sources)."""
    from .sources import UriPath, is_uri

    if isinstance(p, UriPath):
        return p
    return UriPath(str(p)) if is_uri(str(p)) else Path(p)


def mask_settings(options: RunOptions) -> Dict[str, object]:
    """Everything that makes the run's masks, readable: the caller's `made_with` plus the options
    that change masks (not save_similarity or overlay_format, which only add or change pictures)."""
    settings = dict(options.made_with)
    settings["multi"] = options.multi
    if options.multi:
        settings["max_objects"] = options.max_objects
    settings["min_similarity"] = options.min_similarity
    return _strict_json(settings)


def settings_key(settings: Dict[str, object]) -> str:
    """A short hex digest of the settings (canonical JSON): equal keys, equally made masks."""
    text = json.dumps(_strict_json(settings), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _differences(old_key: str, old: Optional[dict], new: dict) -> str:
    """The settings that differ, for a message: 'different checkpoint_sha256, method'."""
    if old_key == UNRECORDED_KEY or not isinstance(old, dict):
        return "settings not recorded: an older persam made them"
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"different {', '.join(names)}" if names else "different settings"


def _strict_json(value):
    """`value` with every non-finite float (NaN, Infinity) replaced by None and numpy scalars made
    plain, so that it can be written as strict JSON."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# the folder lock


@contextlib.contextmanager
def output_lock(folder) -> Iterator[None]:
    """Hold `folder` exclusively while the block runs; InputError when another run holds it.

    An advisory ``fcntl.flock`` on ``folder/.persam.lock`` (which names the holder's pid).  The
    kernel drops the lock when its process ends in any way, so a killed run never blocks the
    next one; the file is removed when the block ends (a run killed with SIGKILL leaves it,
    unlocked, and the next run takes it over).  Without fcntl (not POSIX) there is no lock.

    The folder (and missing folders above it) is made here; the ones made here are removed again
    when the block leaves them empty (a run refused or failed before writing anything)."""
    folder = Path(folder)
    if fcntl is None:  # pragma: no cover
        yield
        return
    made = [f for f in (folder, *folder.parents) if not os.path.lexists(f)]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(made)
        raise InputError(f"cannot create output folder {folder} ({exc.strerror or exc})") from None
    path = folder / LOCK_FILE
    try:
        fd = _lock_file(path, folder)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked here: a run waiting on this file sees it gone and retries
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove each of `folders` (deepest first) while it is empty."""
    for f in folders:
        try:
            os.rmdir(f)
        except OSError:  # not empty (the run's outputs, another run's lock), or gone
            return


def _lock_file(path: Path, folder: Path) -> int:
    """Open and flock `path` (created if missing); the open, locked file descriptor."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"cannot lock output folder {folder} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(
                    f"another persam run{holder} is writing to {folder}; wait for it to finish or use another --out"
                ) from None
            raise InputError(f"cannot lock output folder {folder} ({exc.strerror or exc})") from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:  # a full disk: leave no lock file behind
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
                raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
            return fd
        os.close(fd)  # the run that held it removed the file after we opened it: lock the new one


def _lock_holder(fd: int) -> str:
    """' (pid N)' from a lock file, or '' when it names none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


# --------------------------------------------------------------------------------------------
# results.json of earlier runs


@dataclass
class _Earlier:
    """What results.json says about the folder before this run."""

    records: Dict[str, dict] = field(default_factory=dict)  # by name, each with its "key"
    files: Set[str] = field(default_factory=set)  # files persam wrote here that still exist
    made_with: Dict[str, dict] = field(default_factory=dict)  # key -> the settings of that key


def _read_earlier(folder: Path) -> _Earlier:
    """The records and files of `folder`/results.json; InputError when that file is not ours."""
    path = folder / RESULTS_FILE
    if not os.path.lexists(path):
        return _Earlier()
    data = _results_data(path)
    if data is None:
        raise InputError(
            f"{path} is not a persam results file; refusing to replace it: move it away or use another --out"
        )
    earlier = _Earlier()
    if "key" in data:
        earlier.made_with[str(data["key"])] = data.get("made_with")
        earlier.made_with.update({str(k): v for k, v in (data.get("other_keys") or {}).items()})
    else:  # version 1: no keys; its header is all that is known of how its masks were made
        skip = ("version", "summary", "images")
        earlier.made_with[UNRECORDED_KEY] = {k: v for k, v in data.items() if k not in skip}
    files = {RESULTS_FILE, *[f for f in data.get("files") or [] if isinstance(f, str)]}
    reference = data.get("reference") if isinstance(data.get("reference"), dict) else {}
    if data.get("version") == 1 and (reference.get("points") or reference.get("box")):
        files.add(REFERENCE_MASK_FILE)
    for record in data["images"]:
        if isinstance(record, dict) and isinstance(record.get("name"), str):
            record.setdefault("key", UNRECORDED_KEY)
            earlier.records[record["name"]] = record
            outputs = record.get("outputs")
            files.update(f for f in (outputs.values() if isinstance(outputs, dict) else ()) if isinstance(f, str))
    earlier.files = {f for f in files if "/" not in f and os.path.lexists(folder / f)}
    return earlier


def _results_data(path: Path) -> Optional[dict]:
    """The parsed results.json when it is one persam wrote, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    if data.get("format") == RESULTS_FORMAT or data.get("version") == 1:
        return data
    return None


# --------------------------------------------------------------------------------------------
# the output folder


class OutputFolder:
    """The output folder of a run: what earlier runs left there, what may be written, results.json.

        with OutputFolder(out_dir, options) as folder:  # locks the folder (InputError when taken)
            targets = folder.plan(paths)                 # names, done / skipped; refuses conflicts
            folder.claim(targets)                        # lists the files about to be written
            ...                                          # (the caller's extra_outputs)
            data = folder.run(predictor, concept, targets)

    Without ``with`` nothing is locked (planning only)."""

    def __init__(self, out_dir, options: Optional[RunOptions] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.out_dir = Path(out_dir)
        self.options = options or RunOptions()
        self.log = log or (lambda line: tqdm.write(line, file=sys.stderr))
        self.made_with = mask_settings(self.options)
        self.key = settings_key(self.made_with)
        self.method = self.made_with.get("method")  # for the header; else the concept's, in run()
        self.earlier = _read_earlier(self.out_dir)
        self.files: Set[str] = set(self.earlier.files)  # files persam wrote or is about to write here
        self.records: Dict[str, dict] = {}  # this run's records, by name
        self.targets: List[Target] = []
        self._lock = None
        self._by_folded_name: Optional[Dict[str, List[dict]]] = None

    def __enter__(self) -> "OutputFolder":
        self._lock = output_lock(self.out_dir)
        self._lock.__enter__()
        try:
            self.earlier = _read_earlier(self.out_dir)  # again, now that no other run can change it
        except BaseException:
            self.__exit__(*sys.exc_info())  # `with` does not call __exit__ when __enter__ fails
            raise
        self.files = set(self.earlier.files)
        self._by_folded_name = None
        return self

    def __exit__(self, *exc_info) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(*exc_info)

    # planning

    def plan(self, paths: Sequence[Path]) -> List[Target]:
        """Targets for `paths` with their output names, the done and the skipped marked.

        Raises InputError (one line) when a target lies inside the folder, when an image done by
        an earlier run with other settings would be redone without ``overwrite``, or when a file
        the run would write exists but was not written by persam."""
        paths = [_as_image_path(p) for p in paths]
        for path in paths:
            if _inside(path, self.out_dir):
                raise InputError(f"target image {path} lies inside the output folder {self.out_dir}; "
                                 f"write the outputs to another folder")
        from .sources import image_stat

        stats = [image_stat(p) for p in paths]
        by_image = self._earlier_by_image()
        hashes = [self._content_sha256(p, st, by_image) for p, st in zip(paths, stats)]
        reserved = _reserved_files(self.options)
        names = _unique_names(paths, reserved, lambda name, i: self._name_free(name, paths[i], hashes[i]))
        references = self._references()
        targets = [Target(path, name, sha256=sha, stat=st) for path, name, sha, st in zip(paths, names, hashes, stats)]
        for t in targets:
            if _is_one_of(t, references):
                t.skip_reason = REFERENCE_IMAGE
            else:
                t.done = self._done(t)
        self._refuse_other_settings(targets)
        self._refuse_foreign_files(self._files_to_write(targets))
        self.targets = targets
        self.records = {t.name: self._skip_record(t) for t in targets if not t.pending}
        self._note_other_settings()
        return targets

    @staticmethod
    def _content_sha256(path, stat: Optional[List[int]], by_image: Dict[str, List[dict]]) -> Optional[str]:
        """The image's sha256: an earlier record's when it names the same file (path as given) with
        the same size and modification time (so that images done earlier are not read again,
        locally or from an object store); else the file's bytes hashed."""
        if stat is not None:
            for record in by_image.get(str(path), ()):
                if record.get("image_stat") == stat and isinstance(record.get("image_sha256"), str):
                    return record["image_sha256"]
        return _image_sha256(path)

    def _earlier_by_image(self) -> Dict[str, List[dict]]:
        """Earlier records by their image (path or URI as given)."""
        by_image: Dict[str, List[dict]] = {}
        for record in self.earlier.records.values():
            by_image.setdefault(str(record.get("image")), []).append(record)
        return by_image

    def _name_free(self, name: str, path: Path, sha: Optional[str]) -> bool:
        """False when an earlier record of that name is of another image (its outputs stay)."""
        records = self._earlier_by_folded_name().get(name.casefold(), ())
        return all(_same_image(record, path, sha) for record in records)

    def _earlier_by_folded_name(self) -> Dict[str, List[dict]]:
        """Earlier records by case-folded name (names that differ in case share files on some systems)."""
        if self._by_folded_name is None:
            self._by_folded_name = {}
            for name, record in self.earlier.records.items():
                self._by_folded_name.setdefault(name.casefold(), []).append(record)
        return self._by_folded_name

    def _references(self) -> List[Tuple[Path, Optional[str]]]:
        return [(Path(p).resolve(), _image_sha256(Path(p))) for p in self.options.reference_images]

    def _done(self, target: Target) -> bool:
        """Segmented by an earlier run with this key, from the same image, all outputs there and ours."""
        record = self.earlier.records.get(target.name)
        if self.options.overwrite or not _made_outputs(record) or record.get("key") != self.key:
            return False
        if target.sha256 is None or record.get("image_sha256") != target.sha256:
            return False
        files = output_files(target.name, self.options).values()
        return all(f in self.files and (self.out_dir / f).is_file() for f in files)

    def _refuse_other_settings(self, targets: Sequence[Target]) -> None:
        """InputError when a target to segment has outputs here made with another key (not overwrite)."""
        if self.options.overwrite:
            return
        stale = [(t, self.earlier.records[t.name]) for t in targets
                 if t.pending and _made_outputs(self.earlier.records.get(t.name))
                 and self.earlier.records[t.name].get("key") != self.key]
        if not stale:
            return
        names = ", ".join(t.path.name for t, _ in stale[:3]) + (", ..." if len(stale) > 3 else "")
        old_key = stale[0][1].get("key")
        why = _differences(old_key, self.earlier.made_with.get(old_key), self.made_with)
        raise InputError(
            f"{self.out_dir} holds results for {len(stale)} of these images ({names}) made with other settings "
            f"({why}); use --overwrite to redo them, or another --out"
        )

    def _files_to_write(self, targets: Sequence[Target]) -> List[str]:
        pending = [t for t in targets if t.pending]
        files = [f for t in pending for f in output_files(t.name, self.options).values()]
        return files + list(self.options.extra_outputs if pending else ()) + [RESULTS_FILE]

    def _refuse_foreign_files(self, files: Iterable[str]) -> None:
        """InputError naming the first of `files` that exists in the folder but is not persam's."""
        for name in files:
            path = self.out_dir / name
            if os.path.lexists(path) and name not in self.files:
                raise InputError(f"{path} was not written by persam (results.json there does not list it); "
                                 f"refusing to replace it: use another --out, or move the file away")

    def _note_other_settings(self) -> None:
        """Say so when results.json keeps records of other images made with other settings."""
        names = {t.name for t in self.targets}
        kept = [r for n, r in self.earlier.records.items() if n not in names and r.get("key") != self.key]
        if kept:
            self.log(f"persam: note: {self.out_dir / RESULTS_FILE} also keeps {len(kept)} record(s) of other "
                     f"images made with other settings (described under other_keys there)")

    def _skip_record(self, target: Target) -> dict:
        if target.skip_reason is not None:
            return {"name": target.name, "image": str(target.path), "image_sha256": target.sha256,
                    "key": self.key, "status": "skipped", "reason": target.skip_reason}
        record = dict(self.earlier.records[target.name])
        record.update(status="skipped", reason="already done")
        return record

    # writing

    def claim(self, targets: Sequence[Target]) -> dict:
        """List the files the run will write in results.json before any is written (written first).

        A run killed between writing a file and recording its image thus leaves no file that
        results.json does not list: the next run may replace it, and no file of the user's is
        ever taken for persam's.  The files are checked again first (cheap)."""
        to_write = self._files_to_write(targets)
        self._refuse_foreign_files(to_write)
        self.files.update(to_write)
        return self._save()

    def run(self, predictor, concept: Optional[Concept], targets: Sequence[Target]) -> dict:
        """Segment the pending targets (after :meth:`plan`); write their outputs and results.json
        after every image.  Returns the results dictionary as written.  `predictor` and `concept`
        are used only when something is pending."""
        options = self.options
        if self.method is None and concept is not None:
            self.method = concept.method
        data = self.claim(targets)
        pending = [t for t in targets if t.pending]
        bar = tqdm(total=len(pending), desc="segmenting", unit="image", file=sys.stderr,
                   disable=(not options.progress) if options.progress is not None else None)
        for first in range(0, len(pending), options.batch_size):
            group = pending[first:first + options.batch_size]
            for t, result in zip(group, segment_targets(predictor, concept, group, options)):
                self._keep(t, write_result(self.out_dir, result, self.log))
                data = self._save()
                bar.update(1)
        bar.close()
        return data

    def add_result(self, target: Target, result: ImageResult) -> None:
        """Write one target's outputs (made elsewhere: a worker of another engine) as :meth:`run`
        does, and keep its record, written into results.json with the next :meth:`save`."""
        self._keep(target, write_result(self.out_dir, result, self.log))

    def _keep(self, target: Target, record: dict) -> None:
        record.update(key=self.key, image_sha256=target.sha256, image_stat=target.stat)
        self.records[target.name] = record

    def save(self) -> dict:
        """Write results.json now (see :meth:`add_result`); the results dictionary as written."""
        return self._save()

    def run_counts(self) -> Dict[str, int]:
        """What this run did (results.json's summary counts every record the file keeps, also the
        earlier runs'): ``segmented``, ``errors`` and ``found`` among the images segmented now,
        ``done`` (by an earlier run with the same settings), ``skipped`` (the reference image) and
        ``kept`` (records of other images, from earlier runs, that results.json keeps)."""
        names = {t.name for t in self.targets}
        now = [self.records[t.name] for t in self.targets if t.pending and t.name in self.records]
        return {
            "segmented": sum(r.get("status") == "ok" for r in now),
            "errors": sum(r.get("status") == "error" for r in now),
            "found": sum(r.get("status") == "ok" and bool(r.get("found")) for r in now),
            "done": sum(t.done for t in self.targets),
            "skipped": sum(t.skip_reason is not None for t in self.targets),
            "kept": sum(n not in names for n in self.earlier.records),
        }

    def claim_files(self, names: Sequence[str]) -> dict:
        """List more files (written by the caller: coco.json) in results.json before they are
        written; InputError when one exists and is not persam's."""
        self._refuse_foreign_files(names)
        self.files.update(names)
        return self._save()

    def _save(self) -> dict:
        """Write results.json: this run's records in target order, then the earlier records of
        other images; strict JSON (no NaN / Infinity)."""
        names = {t.name for t in self.targets}
        ordered = [self.records[t.name] for t in self.targets if t.name in self.records]
        ordered += [r for n, r in self.earlier.records.items() if n not in names and n not in self.records]
        other_keys = sorted({r["key"] for r in ordered if r.get("key") != self.key})
        summary = {
            "images": len(ordered),
            "segmented": sum(r.get("status") == "ok" for r in ordered),
            "skipped": sum(r.get("status") == "skipped" for r in ordered),
            "errors": sum(r.get("status") == "error" for r in ordered),
            "found": sum(bool(r.get("found")) for r in ordered),
            "other_settings": sum(r.get("key") != self.key for r in ordered),
        }
        data = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "method": self.method,
                **self.options.info, "multi": self.options.multi, "key": self.key, "made_with": self.made_with}
        if other_keys:
            data["other_keys"] = {k: self.earlier.made_with.get(k) for k in other_keys}
        self.files.add(RESULTS_FILE)
        data.update(files=sorted(self.files), summary=summary, images=ordered)
        data = _strict_json(data)
        atomic_write_text(self.out_dir / RESULTS_FILE, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return data


def _made_outputs(record: Optional[dict]) -> bool:
    """True for a record of an image that was segmented (its outputs written)."""
    return isinstance(record, dict) and isinstance(record.get("outputs"), dict) and record.get("status") != "error"


def _same_image(record: dict, path: Path, sha: Optional[str]) -> bool:
    """True when an earlier record is of the image at `path`: the same file, or the same content."""
    if sha is not None and record.get("image_sha256") == sha:
        return True
    try:
        return Path(str(record.get("image"))).resolve() == path.resolve()
    except (OSError, RuntimeError):
        return False


def _is_one_of(target: Target, references: Sequence[Tuple[Path, Optional[str]]]) -> bool:
    """True when the target image is one of the references: the same file, or the same content."""
    resolved = target.path.resolve()
    return any(resolved == path or (sha is not None and sha == target.sha256) for path, sha in references)


def plan_targets(paths: Sequence[Path], out_dir: Path, options: RunOptions) -> List[Target]:
    """Targets with their output names (see :meth:`OutputFolder.plan`), without locking the folder."""
    return OutputFolder(out_dir, options).plan(paths)


# --------------------------------------------------------------------------------------------
# results


def _floats(x, ndigits: int = 2) -> Optional[list]:
    if x is None:
        return None
    return [round(float(v), ndigits) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def _points(x) -> list:
    return [[round(float(a), 2), round(float(b), 2)] for a, b in np.asarray(x, dtype=np.float64).reshape(-1, 2)]


def _object_record(seg: Segmentation) -> dict:
    return {
        "found": bool(seg.found),
        "iou_score": round(float(seg.iou_score), 5),
        "peak_similarity": round(float(seg.peak_similarity), 5),
        "points": _points(seg.points),
        "labels": [int(v) for v in np.asarray(seg.labels).reshape(-1)],
        "box": _floats(seg.box) if seg.found else None,
        "area": int(np.count_nonzero(seg.mask)),
    }


# --------------------------------------------------------------------------------------------
# one image: the same code for every engine (here, and in the workers of persam.engine_ray)


@dataclass
class ImageResult:
    """What segmenting one target makes: its record and its output files (name, bytes), to be
    written in this order (the mask last: it marks the image done).  No file is written yet:
    :meth:`OutputFolder.add_result` writes them (in the process that holds the folder)."""

    record: dict
    outputs: List[Tuple[str, bytes]] = field(default_factory=list)


def _encode_jpg_or_png(rgb: np.ndarray, fmt: str) -> bytes:
    import cv2

    ext = ".png" if fmt == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise InputError(f"cannot encode the overlay as {fmt}")
    return buf.tobytes()


def _segment_images(predictor, concept: Concept, embeddings,
                    options: RunOptions) -> Tuple[List[List[Segmentation]], List[float], bool]:
    """Each image's segmentations: one object per image, or (``multi``) the objects of each image;
    with the seconds each took and whether those were measured for the whole group (the group's
    time per image) rather than per image.  On a GPU one object per image takes each decoder call
    of the method once for the group; on a CPU each image is segmented alone on one thread
    (:func:`persam.pipeline.each_on_one_thread`)."""
    start = time.perf_counter()
    if not options.multi and predictor.device.type != "cpu":
        segmented = [[seg] for seg in segment_images(predictor, concept, embeddings, options.min_similarity,
                                                     options.save_similarity)]
        return segmented, [(time.perf_counter() - start) / max(1, len(embeddings))] * len(embeddings), True
    from .multi import segment_objects

    def segment_one(pred, embedding) -> Tuple[List[Segmentation], float]:
        start = time.perf_counter()
        if options.multi:
            pred.set_embedding(*embedding)
            segs = list(segment_objects(pred, concept, None, max_objects=options.max_objects,
                                        min_similarity=options.min_similarity))
        else:
            segs = segment_images(pred, concept, [embedding], options.min_similarity, options.save_similarity)
        return segs, time.perf_counter() - start

    # on a CPU each image alone on one thread, up to one per torch thread side by side: its values
    # are then the same whatever the thread count and the images beside it, in either engine
    done = each_on_one_thread(predictor, segment_one, embeddings, decode_workers(predictor, len(embeddings)))
    return [segs for segs, _ in done], [seconds for _, seconds in done], False


def _similarity(predictor, concept: Concept, segs: List[Segmentation]):
    for s in segs:
        if s.similarity is not None:
            return s.similarity
    # on one thread, as the segmentations were made: the map's values depend on torch's thread count
    return each_on_one_thread(predictor, lambda pred, image: locate(pred, concept, image),
                              [predictor.current_image()])[0]


def _encode_outputs(predictor, concept, options, image, segs, found, files) -> List[Tuple[str, bytes]]:
    """The similarity heat map, overlay and mask of one image as file bytes (mask last)."""
    from . import visualize

    outputs = []
    if options.save_similarity:  # over the photo, with its colour scale
        sim = _similarity(predictor, concept, segs)
        picture = visualize.heatmap(sim, image=image)
        outputs.append((files["similarity"], encode_png(picture, path=files["similarity"])))
    points, labels = _all_points(segs)
    boxes = [s.box for s in found if s.box is not None]
    picture = visualize.overlay(image, [s.mask for s in found], points, labels, boxes or None)
    if not found:  # framed in red and marked, as persam track marks its frames
        picture = visualize.mark_not_found(picture)
    outputs.append((files["overlay"], _encode_jpg_or_png(picture, options.overlay_format)))
    if options.multi:
        label_map = np.zeros(image.shape[:2], dtype=np.uint8)
        for k, s in enumerate(found, start=1):
            label_map[np.asarray(s.mask, dtype=bool) & (label_map == 0)] = k
        outputs.append((files["mask"], encode_png(label_map, palette="davis", path=files["mask"])))
    else:
        mask = found[0].mask if found else np.zeros(image.shape[:2], dtype=bool)
        outputs.append((files["mask"], encode_png(np.asarray(mask, dtype=bool), path=files["mask"])))
    return outputs


def _all_points(segs: List[Segmentation]):
    if not segs:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    points = np.concatenate([np.asarray(s.points, dtype=np.float32).reshape(-1, 2) for s in segs])
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64).reshape(-1) for s in segs])
    return points, labels


def error_result(target: Target, message: str) -> ImageResult:
    """The result of a target that could not be loaded (no outputs)."""
    return ImageResult({"name": target.name, "image": str(target.path), "status": "error", "error": message})


def load_target(target: Target, data: Optional[bytes] = None) -> Tuple[Optional[np.ndarray], Optional[ImageResult]]:
    """(the target's RGB image, None), or (None, its error result) when it cannot be loaded.
    `data`: the file's bytes, already read (a worker of the Ray engine)."""
    from .sources import load_image

    try:
        image = load_image(target.path, data)
    except InputError as exc:
        return None, error_result(target, str(exc))
    if not image.flags.writeable:  # torch warns on read-only arrays
        image = image.copy()
    return image, None


def encode_loaded(predictor, images: Sequence[np.ndarray]) -> Tuple[list, List[float], bool]:
    """Encode loaded images: (their ImageEmbeddings, the seconds each took, shared). On a CPU one
    encoder call per image, through `set_image` (a batch of 4 took 6 % longer per image with
    OpenVINO on the project's CPU), each timed; on a GPU all in one call, whose time is shared
    (``shared`` True: each image is given the call's time per image).

    On a CPU the torch encoder, whose values depend on torch's thread count, encodes each image on
    one thread, up to one image per thread side by side (:func:`persam.pipeline.each_on_one_thread`;
    as many images' working memory at once); OpenVINO and ONNX Runtime, whose values do not
    (tests/test_ray_engine.py), take every thread for one image after another."""
    start = time.perf_counter()
    if len(images) > 1 and predictor.device.type != "cpu":
        embeddings = predictor.encode_images(images, batch_size=len(images))
        return embeddings, [(time.perf_counter() - start) / len(images)] * len(images), True
    predictor.prepare()  # built here, once (a compiled encoder that cannot be built falls back to torch)

    def encode(pred, image) -> Tuple[object, float]:
        start = time.perf_counter()
        pred.set_image(image)
        return pred.current_image(), time.perf_counter() - start

    if predictor.device.type == "cpu" and predictor.backend == "torch":
        encoded = each_on_one_thread(predictor, encode, images, decode_workers(predictor, len(images)))
    else:
        encoded = [encode(predictor, image) for image in images]
    return [embedding for embedding, _ in encoded], [seconds for _, seconds in encoded], False


def segment_loaded_images(predictor, concept: Concept, targets: Sequence[Target], images: Sequence[np.ndarray],
                          options: RunOptions, embeddings: Sequence, timings: Sequence[Dict[str, float]] = (),
                          shared: Sequence[str] = ()) -> List[ImageResult]:
    """Segment loaded, encoded targets together (`embeddings`: their ImageEmbeddings): each one's
    record and output files (nothing is written).  On a GPU each decoder call of the method is
    made once for all of them; on a CPU each is segmented alone on one thread (`_segment_images`).

    `timings`: per image, the seconds its earlier steps took (``load_s``, ``encode_s``), and
    `shared` the names of those measured for the whole group (given per image: the group's
    time / its size).  A record's ``timings`` adds ``segment_s`` (shared on a GPU, unless ``multi``,
    where each image is segmented alone, as on a CPU) and ``outputs_s`` (drawing and encoding its output files, per
    image), and says which are shared (``shared``) and the group's size (``group_size``)."""
    timings = list(timings) or [{} for _ in targets]
    segmented, segment_s, segment_shared = _segment_images(predictor, concept, embeddings, options)
    shared = [*shared, *(["segment_s"] if segment_shared else [])]
    results = []
    for target, image, embedding, segs, before, seconds in zip(targets, images, embeddings, segmented, timings,
                                                              segment_s):
        predictor.set_embedding(*embedding)  # the image its outputs are drawn from
        measured = {**before, "segment_s": seconds}
        results.append(_image_result(predictor, concept, target, image, options, segs, measured, shared,
                                     len(targets)))
    return results


def _image_result(predictor, concept: Concept, target: Target, image: np.ndarray, options: RunOptions,
                  segs: List[Segmentation], timings: Dict[str, float], shared: Sequence[str],
                  group_size: int) -> ImageResult:
    """One segmented image's record and output files; `timings`: the seconds of its steps so far
    (see :func:`segment_loaded_images`)."""
    found = [s for s in segs if s.found]
    files = output_files(target.name, options)
    start = time.perf_counter()
    outputs = _encode_outputs(predictor, concept, options, image, segs, found, files)
    timings = {**timings, "outputs_s": time.perf_counter() - start}
    first = segs[0] if segs else None
    points, labels = _all_points(segs)
    boxes = [s.box for s in found if s.box is not None]
    record = {"name": target.name, "image": str(target.path)}
    record.update(
        status="ok",
        size=[int(image.shape[1]), int(image.shape[0])],
        found=bool(found),
        iou_score=round(float(found[0].iou_score if found else (first.iou_score if first else 0.0)), 5),
        peak_similarity=round(float(max((s.peak_similarity for s in segs), default=0.0)), 5),
        points=_points(points),
        labels=[int(v) for v in labels],
        boxes=[_floats(b) for b in boxes],
        timings={**{k: round(float(v), 4) for k, v in timings.items()},
                 "shared": [k for k in shared if k in timings], "group_size": int(group_size)},
        outputs=files,
    )
    if options.multi:
        record["objects"] = [_object_record(s) for s in found]
    return ImageResult(record, outputs)


def write_result(out_dir: Path, result: ImageResult, log: Callable[[str], None]) -> dict:
    """Write one image's output files atomically, in order (the mask last); its record (a copy).
    A failure or an interruption while writing leaves none of its outputs behind; an error
    record is reported through `log`."""
    written: List[Path] = []
    try:
        for name, data in result.outputs:
            written.append(atomic_write_bytes(Path(out_dir) / name, data))
    except BaseException:  # interrupted or failed: leave no outputs of this image behind
        for path in written:
            path.unlink(missing_ok=True)
        raise
    record = dict(result.record)
    if record.get("status") == "error":
        log(f"persam: warning: {record.get('error')} (skipped)")
    return record


def segment_targets(predictor, concept: Concept, targets: Sequence[Target], options: RunOptions,
                    data: Optional[Sequence[Optional[bytes]]] = None) -> List[ImageResult]:
    """Load, encode and segment targets together (:func:`segment_loaded_images`): each one's
    record (status ok, or error when it cannot be loaded) and output files, in order.  `data`:
    the files' bytes, already read (None each: read here; a record's ``load_s`` is then the
    decoding alone).  Nothing is written."""
    results: List[Optional[ImageResult]] = []
    loaded = []  # (position, target, image, seconds to load it)
    for i, (target, content) in enumerate(zip(targets, data if data is not None else [None] * len(targets))):
        start = time.perf_counter()
        image, failed = load_target(target, content)
        results.append(failed)
        if failed is None:
            loaded.append((i, target, image, time.perf_counter() - start))
    if loaded:
        images = [image for _, _, image, _ in loaded]
        embeddings, encode_s, encode_shared = encode_loaded(predictor, images)
        timings = [{"load_s": load_s, "encode_s": seconds} for (_, _, _, load_s), seconds in zip(loaded, encode_s)]
        segmented = segment_loaded_images(predictor, concept, [t for _, t, _, _ in loaded], images, options,
                                          embeddings, timings, ["encode_s"] if encode_shared else [])
        for (i, _, _, _), result in zip(loaded, segmented):
            results[i] = result
    return results


# --------------------------------------------------------------------------------------------
# the run


def run_batch(
    predictor,
    concept: Concept,
    targets: Sequence[Target],
    out_dir,
    options: Optional[RunOptions] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Segment every target not done yet; write its outputs and results.json (after each image).

    The folder is locked and the targets planned again under the lock (:class:`OutputFolder`),
    which raises InputError on conflicts.  Returns the results dictionary (as written).  `log`
    receives one line per problem (default: stderr, through tqdm so that the progress bar stays
    intact)."""
    with OutputFolder(out_dir, options, log) as folder:
        planned = folder.plan([t.path for t in targets])
        return folder.run(predictor, concept, planned)
