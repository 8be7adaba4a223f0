"""A folder persam writes into, and the promises kept about it (:class:`OwnedFolder`).

Every command that writes a folder (``segment`` and ``apply``: persam.runs.folder; ``track``:
persam.runs.track_folder; ``eval``: eval.outputs; the page's zip) keeps the same promises, here:

* **One run at a time.**  The folder is locked while the run holds it (:func:`output_lock`);
  a folder the run created is removed again when the run leaves it empty (a refused run leaves
  nothing behind).  A run that fails before it has written any output (a model that cannot be
  built, say) takes back the record file it created, so its folder is left as it found it.
* **Nothing of the user's is replaced.**  The folder's record file (results.json, eval.json)
  lists (``files``) every file persam wrote there.  A file the run would write that exists but
  is not listed is refused.  Files are listed *before* they are written (the record file is
  rewritten first), so a run killed in between leaves only listed files behind, and the next
  run may replace them.
* **Only persam's files are removed**, never a link, and the folders they leave empty with them.

What the record file holds besides ``files`` (the records of images, frames or predictions, the
key of the settings that made them) is the command's; each reads and writes its own format
through :meth:`OwnedFolder.read_record` and :meth:`OwnedFolder.write_record`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Set

from persam.data.io import atomic_write_text
from persam.errors import SettingError
from persam.runs.key import strict_json
from persam.runs.lock import output_lock

__all__ = ["OwnedFolder", "relative_name"]


def relative_name(name: object) -> Optional[str]:
    """`name` when it is a plain relative path inside the folder ('pred/cat/01.png'), else None."""
    if not isinstance(name, str) or not name or "\\" in name:
        return None
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        return None
    return name


class OwnedFolder:
    """A folder with a record file listing the files persam wrote there (see the module doc).

        with OwnedFolder(out_dir, "results.json") as folder:  # locks; SettingError when taken
            folder.list_files(["a.png"])   # refused when a.png is the user's; listed, record written
            ...                            # then a.png is written

    Subclasses keep their own records and say what the record file holds (:meth:`record`);
    :meth:`read` is called again once the folder is locked (another run may have changed it)."""

    def __init__(self, out_dir, record_file: str) -> None:
        self.out_dir = Path(out_dir)
        self.record_file = record_file
        self.files: Set[str] = set()  # files persam wrote (or is about to write) here, '/'-separated
        self._lock = None
        self._record_is_new = False  # no record file when the run took the folder

    def __enter__(self):
        try:
            lock = output_lock(self.out_dir)
            lock.__enter__()
            self._lock = lock
            self._record_is_new = not os.path.lexists(self.record_path)
            self.read()
        except BaseException:
            self.__exit__(*sys.exc_info())  # `with` does not call __exit__ when __enter__ fails
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if exc_info[0] is not None and self._record_is_new and not any(
                    os.path.lexists(self.out_dir / name) for name in self.files - {self.record_file}):
                self.record_path.unlink(missing_ok=True)  # failed before any output: nothing to resume
        finally:
            lock.__exit__(*exc_info)

    # the record file

    @property
    def record_path(self) -> Path:
        return self.out_dir / self.record_file

    def read(self) -> None:
        """Read what the record file says (subclasses); called by ``with`` once the folder is locked."""

    def read_record(self) -> Optional[object]:
        """The parsed record file; None when there is none; ``False`` when it is not JSON."""
        if not os.path.lexists(self.record_path):
            return None
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False

    def not_ours(self, what: str) -> SettingError:
        """The refusal of a record file that is not persam's (`what`: "a persam results file")."""
        return SettingError(f"{self.record_path} is not {what}; refusing to replace it: move it away or use another "
                            f"{{out}}", "out")

    def newer(self, what: str, version: object) -> SettingError:
        return SettingError(f"{self.record_path} was written by a newer persam ({what} version {version!r}); "
                            f"upgrade persam or use another {{out}}", "out")

    def keep_listed(self, names: Iterable[object]) -> Set[str]:
        """The files the record lists that are plain names inside the folder and still there."""
        listed = (relative_name(n) for n in names)
        return {n for n in listed if n is not None and os.path.lexists(self.out_dir / n)}

    def record(self) -> dict:
        """What the record file holds (subclasses); ``files`` goes where this dict has a "files" key,
        else last."""
        return {}

    def write_record(self) -> dict:
        """Write the record file now (strict JSON: no NaN / Infinity, atomically); the data written."""
        self.files.add(self.record_file)
        data = strict_json({**self.record(), "files": sorted(self.files)})
        atomic_write_text(self.record_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
        return data

    # the files

    def refuse_foreign(self, names: Iterable[str]) -> None:
        """SettingError naming the first of `names` that exists in the folder but is not persam's."""
        for name in names:
            path = self.out_dir / name
            if os.path.lexists(path) and name not in self.files:
                raise SettingError(
                    f"{path} was not written by persam ({self.record_file} there does not list it); refusing to "
                    f"replace it: use another {{out}}, or move the file away", "out")

    def list_files(self, names: Iterable[str]) -> dict:
        """List `names` in the record file before any of them is written (refused when one is the
        user's); the record as written."""
        names = list(names)
        self.refuse_foreign(names)
        self.files.update(names)
        return self.write_record()

    def remove(self, names: Iterable[str]) -> None:
        """Remove files persam wrote here (never a link), and the folders they leave empty."""
        names = list(names)
        for name in names:
            path = self.out_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
            self.files.discard(name)
        for name in names:
            parent = (self.out_dir / name).parent
            while parent != self.out_dir and self.out_dir in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
