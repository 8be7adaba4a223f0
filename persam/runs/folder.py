"""The output folder of a batch run and the promises kept about it (:class:`OutputFolder`).

Into the output folder go, for every target image, each written atomically:

    <name>.png              the mask, 0/255 (with ``multi``: a palette label PNG, object k = k)
    <name>_overlay.jpg      the image with the mask(s), prompt points and box(es)
    <name>_similarity.png   the target-similarity heat map (with ``save_similarity``)
    results.json            one record per image, rewritten after every image

The output folder is shared with the user and with later runs; :class:`OutputFolder` keeps
four promises about it (the lock and the listing of files are :class:`persam.runs.owned.OwnedFolder`'s,
shared with ``track``, ``eval`` and the page):

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
* **One run at a time.**  The folder is locked for the whole run.
* **Outputs never collide.**  Output names are chosen so that no two outputs of the run are
  the same file, and none is results.json or reference_mask.png (:func:`plan_targets`).

The images are segmented by an engine: the local one (:func:`persam.runs.local.run_folder`) or the
Ray engine (persam.runs.engine_ray, whose workers make the results that :meth:`OutputFolder.add_result`
writes on the driver).  A target that is the reference image (same file or same content) is
skipped and recorded as such; an image that cannot be loaded is recorded as an error.
results.json is strict JSON (no NaN or Infinity).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from tqdm import tqdm

from persam.errors import InputError, SettingError
from persam.runs.key import UNRECORDED_KEY, as_image_path, differences, image_sha256, mask_settings, settings_key
from persam.runs.lock import LOCK_FILE
from persam.runs.owned import OwnedFolder
from persam.runs.records import (REFERENCE_IMAGE, REFERENCE_MASK_FILE, RESULTS_FILE, RESULTS_FORMAT, RESULTS_VERSION,
                                 ImageResult, RunOptions, Target, output_files, write_result)

_OUTPUT_SUFFIXES = ("_overlay", "_similarity")  # a stem ending so could be another image's output


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
        raise SettingError(
            f"{path} is not a persam results file; refusing to replace it: move it away or use another {{out}}",
            "out")
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


class OutputFolder(OwnedFolder):
    """The output folder of a run: what earlier runs left there, what may be written, results.json.

        with OutputFolder(out_dir, options) as folder:  # locks the folder (InputError when taken)
            targets = folder.plan(paths)                 # names, done / skipped; refuses conflicts
            folder.claim(targets)                        # lists the files about to be written
            ...                                          # (the caller's extra_outputs)
            data = run_folder(folder, predictor, concept, targets)  # persam.runs.local

    Without ``with`` nothing is locked (planning only).  The lock and the files' listing are
    :class:`persam.runs.owned.OwnedFolder`'s."""

    def __init__(self, out_dir, options: Optional[RunOptions] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        super().__init__(out_dir, RESULTS_FILE)
        self.options = options or RunOptions()
        self.log = log or (lambda line: tqdm.write(line, file=sys.stderr))
        self.made_with = mask_settings(self.options)
        self.key = settings_key(self.made_with)
        self.method = self.made_with.get("method")  # for the header; else the concept's (run_folder)
        self.records: Dict[str, dict] = {}  # this run's records, by name
        self.targets: List[Target] = []
        self.read()

    def read(self) -> None:
        """What results.json says (again once the folder is locked: no other run can change it then)."""
        self.earlier = _read_earlier(self.out_dir)
        self.files = set(self.earlier.files)  # files persam wrote or is about to write here
        self._by_folded_name: Optional[Dict[str, List[dict]]] = None

    # planning

    def plan(self, paths: Sequence[Path]) -> List[Target]:
        """Targets for `paths` with their output names, the done and the skipped marked.

        Raises InputError (one line) when a target lies inside the folder, when an image done by
        an earlier run with other settings would be redone without ``overwrite``, or when a file
        the run would write exists but was not written by persam."""
        paths = [as_image_path(p) for p in paths]
        for path in paths:
            if _inside(path, self.out_dir):
                raise InputError(f"target image {path} lies inside the output folder {self.out_dir}; "
                                 f"write the outputs to another folder")
        from persam.data.sources import image_stat

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
        self.refuse_foreign(self._files_to_write(targets))
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
        return image_sha256(path)

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
        return [(Path(p).resolve(), image_sha256(Path(p))) for p in self.options.reference_images]

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
        why = differences(old_key, self.earlier.made_with.get(old_key), self.made_with)
        raise SettingError(
            f"{self.out_dir} holds results for {len(stale)} of these images ({names}) made with other settings "
            f"({why}); use {{overwrite}} to redo them, or another {{out}}", "overwrite", "out")

    def _files_to_write(self, targets: Sequence[Target]) -> List[str]:
        pending = [t for t in targets if t.pending]
        files = [f for t in pending for f in output_files(t.name, self.options).values()]
        return files + list(self.options.extra_outputs if pending else ()) + [RESULTS_FILE]

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
        return self.list_files(self._files_to_write(targets))

    def add_result(self, target: Target, result: ImageResult) -> None:
        """Write one target's outputs (made by an engine: persam.runs.local, or a worker of the Ray
        engine) and keep its record, written into results.json with the next :meth:`save`."""
        self._keep(target, write_result(self.out_dir, result, self.log))

    def _keep(self, target: Target, record: dict) -> None:
        record.update(key=self.key, image_sha256=target.sha256, image_stat=target.stat)
        self.records[target.name] = record

    def save(self) -> dict:
        """Write results.json now (see :meth:`add_result`); the results dictionary as written."""
        return self.write_record()

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
        return self.list_files(names)

    def record(self) -> dict:
        """results.json: this run's records in target order, then the earlier records of other images."""
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
        data.update(files=None, summary=summary, images=ordered)
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

