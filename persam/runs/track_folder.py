"""The output folder of a ``persam track`` run (:class:`TrackFolder`): an
:class:`persam.runs.owned.OwnedFolder` (locked, nothing of the user's replaced, files listed before
they are written) whose results.json holds one record per processed frame.

The run's ``key`` (:func:`persam.runs.key.settings_key` of what makes the masks) must match the
folder's, else the run is refused unless ``overwrite`` (which redoes everything).  Frames whose
mask is there and listed are kept from an earlier run with the same key; so are the overlay video
and where an earlier run stopped (a video that could not be decoded to its end).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from persam.data.video_writer import OVERLAY_FILES
from persam.errors import SettingError
from persam.runs.key import differences, settings_key, strict_json
from persam.runs.lock import LOCK_FILE
from persam.runs.owned import OwnedFolder
from persam.runs.records import RESULTS_FILE

__all__ = ["TRACK_FORMAT", "TRACK_VERSION", "TrackFolder"]

TRACK_FORMAT = "persam-track"
TRACK_VERSION = 1


class TrackFolder(OwnedFolder):
    """results.json of a track run: the files persam wrote, the key, the frames' records.

        with TrackFolder(out_dir, made_with, header, overwrite, log) as folder:  # locks; reads results.json
            folder.refuse_foreign(outputs)
            folder.list_files(outputs)       # before any is written
            folder.records[index] = record   # per processed frame
            folder.save()
    """

    def __init__(self, out_dir, made_with: dict, header: dict, overwrite: bool,
                 log: Callable[[str], None]) -> None:
        super().__init__(out_dir, RESULTS_FILE)
        self.made_with = strict_json(made_with)
        self.key = settings_key(self.made_with)
        self.header = header
        self.overwrite = overwrite
        self.log = log
        self.records: Dict[int, dict] = {}
        self.stopped: Optional[dict] = None
        self.overlay: Optional[dict] = None

    def read(self) -> None:
        earlier = self._earlier()
        self.files = {RESULTS_FILE}
        if earlier is None:
            return
        self.files |= self.keep_listed(f for f in earlier.get("files") or [] if isinstance(f, str) and "/" not in f)
        same = earlier.get("key") == self.key
        records = [r for r in earlier["frames"] if isinstance(r, dict) and isinstance(r.get("index"), int)]
        if not same and records and not self.overwrite:
            why = differences(str(earlier.get("key")), earlier.get("made_with"), self.made_with)
            raise SettingError(f"{self.out_dir} holds `persam track` results made with other settings ({why}); use "
                               f"{{overwrite}} to redo them, or another {{out}}", "overwrite", "out")
        if same and not self.overwrite:
            self.records = {r["index"]: r for r in records
                            if isinstance(r.get("mask"), str) and r["mask"] in self.files
                            and (self.out_dir / r["mask"]).is_file()}
            self.stopped = earlier.get("stopped") if isinstance(earlier.get("stopped"), dict) else None
            overlay = earlier.get("overlay")
            if isinstance(overlay, dict) and (overlay.get("frames") == [] or (
                    overlay.get("file") in OVERLAY_FILES and overlay["file"] in self.files
                    and (self.out_dir / overlay["file"]).is_file())):
                self.overlay = overlay

    def _earlier(self) -> Optional[dict]:
        """The folder's results.json when it is a `persam track` one; None when there is none;
        SettingError when it is something else."""
        data = self.read_record()
        if data is None:
            return None
        if isinstance(data, dict) and data.get("format") == TRACK_FORMAT and isinstance(data.get("frames"), list):
            version = data.get("version")
            if not isinstance(version, int) or version > TRACK_VERSION:
                raise self.newer("track results", version)
            return data
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            raise SettingError(f"{self.record_path} holds the results of `persam segment` / `apply`, not of "
                               f"`persam track`; use another {{out}}", "out")
        raise self.not_ours("a persam results file")

    def claim(self, names: Sequence[str]) -> None:
        """List `names` in results.json before any of them is written (written now when new)."""
        new = [n for n in names if n not in self.files]
        if new:
            self.list_files(new)

    def remove_stale(self, keep: Sequence[str]) -> None:
        """``overwrite``: remove the files of earlier runs that this run does not write (ours only)."""
        keep = set(keep) | {RESULTS_FILE, LOCK_FILE}
        self.remove(sorted(self.files - keep))

    def save(self, summary: Optional[dict] = None) -> dict:
        self._summary = summary
        return self.write_record()

    def record(self) -> dict:
        records = [self.records[i] for i in sorted(self.records)]
        ids = self.header.get("objects") or []
        found = {str(i): sum(any(o["id"] == i and o["found"] for o in r["objects"]) for r in records) for i in ids}
        times = [r["time_s"] for r in records if not r.get("reference")]
        return {"format": TRACK_FORMAT, "version": TRACK_VERSION, **self.header, "key": self.key,
                "made_with": self.made_with, "files": None, "overlay": self.overlay, "stopped": self.stopped,
                "summary": {"frames": len(records), "found": found,
                            "not_found": {k: len(records) - v for k, v in found.items()},
                            "mean_time_s": round(sum(times) / len(times), 4) if times else None,
                            **(getattr(self, "_summary", None) or {})},
                "frames": records}
