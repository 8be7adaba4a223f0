"""The output folder of a benchmark run (``persam eval``): a :class:`persam.runs.owned.OwnedFolder`
(locked, nothing of the user's replaced, files listed before they are written) whose record is:

    OUT/eval.json                 which files persam wrote here (``files``) and what made the
                                  predictions in OUT/pred (``key``, ``made_with``)
    OUT/pred/...                  the predictions
    OUT/scores.csv, .json, .png   the scores

* **Predictions are never mixed.**  ``key`` is :func:`persam.runs.key.settings_key` of what makes
  the predictions (the benchmark and its data folder, the method and its settings, the model
  type, the checkpoint's sha256, the precision, the benchmark's own options).  A prediction is
  kept from an earlier run only when the folder's key is the run's; a run with another key into
  a folder that holds predictions is refused unless ``overwrite``, which removes the earlier
  predictions (persam's only) and makes them again.  Scoring existing predictions (``--pred``)
  writes only the scores and leaves the folder's predictions and key as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from persam.runs.key import differences, settings_key, strict_json
from persam.errors import SettingError
from persam.runs.owned import OwnedFolder

__all__ = ["EVAL_FILE", "PRED_FOLDER", "SCORE_FILES", "EvalFolder"]

EVAL_FILE = "eval.json"
EVAL_FORMAT = "persam-eval"
EVAL_VERSION = 1
PRED_FOLDER = "pred"
SCORE_FILES = ("scores.csv", "scores.json", "scores.png")


class EvalFolder(OwnedFolder):
    """OUT of one benchmark run (see the module doc).

        with EvalFolder(out_dir, made_with, overwrite) as folder:  # locks; reads eval.json
            todo = folder.plan(predictions)   # the predictions to make; refuses conflicts
            folder.claim(todo + SCORE_FILES)  # lists them in eval.json before any is written
            ...

    `made_with` is None for a run that only scores existing predictions."""

    def __init__(self, out_dir, made_with: Optional[dict] = None, overwrite: bool = False) -> None:
        super().__init__(out_dir, EVAL_FILE)
        self.made_with = None if made_with is None else strict_json(made_with)
        self.key = None if made_with is None else settings_key(self.made_with)
        self.overwrite = overwrite
        self.earlier_key: Optional[str] = None
        self.earlier_made_with: Optional[dict] = None
        self.done: set = set()  # predictions kept from earlier runs (after plan)
        self._stale: List[str] = []  # predictions of another key, removed by claim (overwrite)

    @property
    def pred_dir(self) -> Path:
        return self.out_dir / PRED_FOLDER

    def read(self) -> None:
        data = self.read_record()
        if data is None:
            return
        if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT or not isinstance(data.get("files"), list):
            raise self.not_ours("a persam eval record")
        version = data.get("version")
        if not isinstance(version, int) or version > EVAL_VERSION:
            raise self.newer("eval record", version)
        self.files = self.keep_listed(data["files"])
        self.earlier_key = data.get("key") if isinstance(data.get("key"), str) else None
        self.earlier_made_with = data.get("made_with") if isinstance(data.get("made_with"), dict) else None

    def record(self) -> dict:
        return {"format": EVAL_FORMAT, "version": EVAL_VERSION, "key": self.earlier_key,
                "made_with": self.earlier_made_with}

    def _earlier_predictions(self) -> List[str]:
        prefix = PRED_FOLDER + "/"
        return sorted(f for f in self.files if f.startswith(prefix) and (self.out_dir / f).is_file())

    def plan(self, predictions: Sequence[str]) -> List[str]:
        """The predictions of the run (names relative to the folder, 'pred/<class>/<name>.png') that
        are still to be made; the others were made by an earlier run with the same key (``done``).

        SettingError when the folder holds predictions made with another key (unless ``overwrite``),
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

    def claim(self, names: Sequence[str]) -> None:
        """List `names` in eval.json before any of them is written (checked first); a run that
        makes predictions also records its key here, after removing the predictions of another
        key (``overwrite``)."""
        self.refuse_foreign(names)
        if self._stale:
            self.remove(self._stale)
            self.write_record()  # the files are gone before the new key is recorded
            self._stale = []
        if self.key is not None:
            self.earlier_key, self.earlier_made_with = self.key, self.made_with
        self.list_files(names)
