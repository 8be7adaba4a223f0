"""The output folder of a benchmark run (``persam eval``), with the promises of persam.runs.folder's:

    OUT/eval.json                 which files persam wrote here (``files``) and what made the
                                  predictions in OUT/pred (``key``, ``made_with``)
    OUT/pred/...                  the predictions
    OUT/scores.csv, .json, .png   the scores

* **Nothing of the user's is replaced.**  A file the run would write that exists but is not
  listed in eval.json is refused.  Files are listed before they are written.
* **Predictions are never mixed.**  ``key`` is :func:`persam.runs.key.settings_key` of what makes
  the predictions (the benchmark and its data folder, the method and its settings, the model
  type, the checkpoint's sha256, the precision, the benchmark's own options).  A prediction is
  kept from an earlier run only when the folder's key is the run's; a run with another key into
  a folder that holds predictions is refused unless ``overwrite``, which removes the earlier
  predictions (persam's only) and makes them again.  Scoring existing predictions (``--pred``)
  writes only the scores and leaves the folder's predictions and key as they are.
* **One run at a time.**  The folder is locked for the whole run (:func:`persam.runs.lock.output_lock`).
* **A refused run leaves nothing behind**: a folder the run created is removed again when the
  run stops before writing anything into it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable, List, Optional, Sequence, Set

from persam.errors import SettingError
from persam.data.io import atomic_write_text
from persam.runs.key import differences, settings_key, strict_json
from persam.runs.lock import output_lock

__all__ = ["EVAL_FILE", "PRED_FOLDER", "SCORE_FILES", "EvalFolder"]

EVAL_FILE = "eval.json"
EVAL_FORMAT = "persam-eval"
EVAL_VERSION = 1
PRED_FOLDER = "pred"
SCORE_FILES = ("scores.csv", "scores.json", "scores.png")


def _relative_name(name: object) -> Optional[str]:
    """`name` when it is a plain relative path inside the folder ('pred/cat/01.png'), else None."""
    if not isinstance(name, str) or not name or "\\" in name:
        return None
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        return None
    return name


class EvalFolder:
    """OUT of one benchmark run (see the module doc).

        with EvalFolder(out_dir, made_with, overwrite) as folder:  # locks; reads eval.json
            todo = folder.plan(predictions)   # the predictions to make; refuses conflicts
            folder.claim(todo + SCORE_FILES)  # lists them in eval.json before any is written
            ...

    `made_with` is None for a run that only scores existing predictions."""

    def __init__(self, out_dir, made_with: Optional[dict] = None, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.made_with = None if made_with is None else strict_json(made_with)
        self.key = None if made_with is None else settings_key(self.made_with)
        self.overwrite = overwrite
        self.files: Set[str] = set()  # files persam wrote here (relative, '/'-separated)
        self.earlier_key: Optional[str] = None
        self.earlier_made_with: Optional[dict] = None
        self.done: Set[str] = set()  # predictions kept from earlier runs (after plan)
        self._stale: List[str] = []  # predictions of another key, removed by claim (overwrite)
        self._lock = None

    @property
    def pred_dir(self) -> Path:
        return self.out_dir / PRED_FOLDER

    def __enter__(self) -> "EvalFolder":
        try:
            lock = output_lock(self.out_dir)
            lock.__enter__()  # creates the folder, and removes it again if the run leaves it empty
            self._lock = lock
            self._read_earlier()
        except BaseException:
            self.__exit__(*sys.exc_info())  # `with` does not call __exit__ when __enter__ fails
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(*exc_info)

    def _read_earlier(self) -> None:
        path = self.out_dir / EVAL_FILE
        if not os.path.lexists(path):
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT or not isinstance(data.get("files"), list):
            raise SettingError(f"{path} is not a persam eval record; refusing to replace it: move it away or use "
                               f"another {{out}}", "out")
        version = data.get("version")
        if not isinstance(version, int) or version > EVAL_VERSION:
            raise SettingError(f"{path} was written by a newer persam (eval record version {version!r}); "
                               f"upgrade persam or use another {{out}}", "out")
        names = (_relative_name(f) for f in data["files"])
        self.files = {f for f in names if f is not None and os.path.lexists(self.out_dir / f)}
        self.earlier_key = data.get("key") if isinstance(data.get("key"), str) else None
        self.earlier_made_with = data.get("made_with") if isinstance(data.get("made_with"), dict) else None

    def _earlier_predictions(self) -> List[str]:
        prefix = PRED_FOLDER + "/"
        return sorted(f for f in self.files if f.startswith(prefix) and (self.out_dir / f).is_file())

    def plan(self, predictions: Sequence[str]) -> List[str]:
        """The predictions of the run (names relative to the folder, 'pred/<class>/<name>.png') that
        are still to be made; the others were made by an earlier run with the same key (``done``).

        InputError when the folder holds predictions made with another key (unless ``overwrite``),
        or when a file the run would write exists but is not persam's."""
        if self.key is None:
            raise ValueError("plan() is for a run that makes predictions (made_with given)")
        earlier = self._earlier_predictions()
        if earlier and self.earlier_key != self.key:
            if not self.overwrite:
                why = differences(self.earlier_key or "", self.earlier_made_with, self.made_with)
                raise SettingError(f"{self.out_dir} holds {len(earlier)} prediction(s) made with other settings "
                                   f"({why}); use {{overwrite}} to redo them, or another {{out}}", "overwrite", "out")
            self._stale = earlier
        same = self.earlier_key == self.key and not self.overwrite
        self.done = {f for f in predictions if same and f in self.files and (self.out_dir / f).is_file()}
        todo = [f for f in predictions if f not in self.done]
        self.refuse_foreign([*todo, *SCORE_FILES])
        return todo

    def is_done(self, path) -> bool:
        """True for a prediction (a path inside the folder) kept from an earlier run."""
        try:
            name = Path(path).relative_to(self.out_dir).as_posix()
        except ValueError:
            return False
        return name in self.done

    def refuse_foreign(self, names: Iterable[str]) -> None:
        """InputError naming the first of `names` that exists in the folder but is not persam's."""
        for name in names:
            path = self.out_dir / name
            if os.path.lexists(path) and name not in self.files:
                raise SettingError(f"{path} was not written by persam ({self.out_dir / EVAL_FILE} does not list it); "
                                   f"refusing to replace it: use another {{out}}, or move the file away", "out")

    def claim(self, names: Sequence[str]) -> None:
        """List `names` in eval.json before any of them is written (checked first); a run that
        makes predictions also records its key here, after removing the predictions of another
        key (``overwrite``)."""
        self.refuse_foreign(names)
        if self._stale:
            self._remove(self._stale)
            self._stale = []
        if self.key is not None:
            self.earlier_key, self.earlier_made_with = self.key, self.made_with
        self.files.update(names)
        self._save()

    def _remove(self, names: Sequence[str]) -> None:
        """Remove files persam wrote here (never a link), and the folders they leave empty."""
        for name in names:
            path = self.out_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
            self.files.discard(name)
        self._save()  # the files are gone before the new key is recorded
        for name in names:
            parent = (self.out_dir / name).parent
            while parent != self.out_dir and self.out_dir in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def _save(self) -> None:
        self.files.add(EVAL_FILE)
        data = {"format": EVAL_FORMAT, "version": EVAL_VERSION, "key": self.earlier_key,
                "made_with": self.earlier_made_with, "files": sorted(self.files)}
        atomic_write_text(self.out_dir / EVAL_FILE, json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n")
