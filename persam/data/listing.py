"""Listing the local folders and glob patterns of a SOURCE, within its limits, and the notes on
what a listing skipped (see :mod:`persam.data.sources` for what a SOURCE is).

:class:`ExpansionLimits` bounds the listing of one SOURCE; :class:`Note` is a message about
something skipped on purpose.  :func:`_list_folder` lists one folder (not recursive) and
:func:`_glob_local` walks a local glob pattern, each folder once; :func:`_glob_match` is the same
glob matching over an object store's '/'-separated paths.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple

from persam.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "ExpansionLimits", "Note"]

# What a folder or a pattern takes as images (Pillow reads them all; of a GIF, the first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ExpansionLimits:
    """How far one SOURCE may be expanded: at most `max_entries` files and folders listed and
    `max_seconds` spent listing them.  A `**` over a huge tree or a hung network file system is
    refused with a message naming the SOURCE instead of listing for ever."""

    max_entries: int = 1_000_000
    max_seconds: float = 120.0


class Note(str):
    """A message of the expansion about something skipped on purpose (not a regular file, not an
    image format, a subfolder of a folder): a note, where the other messages are warnings."""


class _Budget:
    """The listing done for one SOURCE, against its :class:`ExpansionLimits`."""

    def __init__(self, source: str, limits: ExpansionLimits) -> None:
        self.source, self.limits = source, limits
        self.entries = 0
        self.deadline = time.monotonic() + limits.max_seconds

    def spend(self, entries: int = 1) -> None:
        self.entries += entries
        if self.entries > self.limits.max_entries:
            why = f"{self.limits.max_entries:,} files and folders"
        elif time.monotonic() > self.deadline:
            why = f"{self.limits.max_seconds:g} s"
        else:
            return
        raise InputError(f"target {self.source}: stopped listing it after {why} (the limit against endless "
                         f"listings); give a narrower folder or pattern, or a text file of the image paths")


def _plural(n: int, word: str, plural: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


@dataclass
class _Skipped:
    """What a listing left out, for its one note."""

    formats: Counter = field(default_factory=Counter)  # files of other formats, by extension
    special: int = 0  # entries that are not regular files (FIFO, socket, device, link to nothing)
    folders: int = 0  # subfolders of a folder (not searched)
    unreadable: int = 0  # folders that could not be listed

    def note(self, where: str, pattern: str) -> Optional[Note]:
        parts = []
        if self.formats:
            kinds = ", ".join(f"{ext} {n}" for ext, n in sorted(self.formats.items(), key=lambda kv: (-kv[1], kv[0])))
            parts.append(f"{_plural(sum(self.formats.values()), 'file')} not in an image format ({kinds})")
        if self.special == 1:
            parts.append("1 entry that is not a regular file (a FIFO, socket, device or link to nothing)")
        elif self.special:
            parts.append(f"{self.special} entries that are not regular files (FIFOs, sockets, devices or links "
                         f"to nothing)")
        if self.folders:
            parts.append(f"{_plural(self.folders, 'subfolder')}, not searched (give '{pattern}' to include them)")
        if self.unreadable:
            parts.append(f"{_plural(self.unreadable, 'folder')} that could not be listed")
        return Note(f"{where}: skipped {'; '.join(parts)}") if parts else None

    def count_file(self, name: str) -> None:
        if not name.startswith("."):  # .DS_Store and the like are not worth a word
            self.formats[PurePosixPath(name).suffix.lower() or "(no extension)"] += 1


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file or a folder"


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file' (a regular file) or 'other', following symbolic links; 'other' when unknown."""
    try:
        if entry.is_dir():
            return "dir"
        return "file" if entry.is_file() else "other"
    except OSError:
        return "other"


def _list_folder(folder: Path, budget: _Budget) -> Tuple[List[Path], _Skipped]:
    """A folder's image files (regular files with an image extension), sorted, and what was left out."""
    images, skipped = [], _Skipped()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                budget.spend()
                kind = _entry_kind(entry)
                if kind == "dir":
                    skipped.folders += not entry.name.startswith(".")
                elif kind == "other":
                    skipped.special += 1
                elif _is_image_name(entry.name):
                    images.append(folder / entry.name)
                else:
                    skipped.count_file(entry.name)
    except OSError as exc:
        raise InputError(f"folder {folder}: cannot list it ({exc.strerror or exc})") from None
    return sorted(images), skipped


def _recursive_hint(pattern: str) -> str:
    head = pattern.split("*", 1)[0].rsplit("/", 1)[0]
    return f"{head}/**/*" if head else "**/*"


def _glob_local(pattern: str, budget: _Budget) -> Tuple[List[Path], _Skipped]:
    """The regular image files matching a local glob pattern, sorted (``*``, ``?`` and ``[...]``
    within one name, ``**`` any folders below; hidden names only where the pattern spells the dot,
    as :func:`glob.glob`), and what matched but was left out.

    The folders are walked breadth first from the pattern's last folder before a wildcard.  Below a
    ``**`` each folder is entered once: one reached again (the same device and inode, through a
    symbolic link) is not listed again, so loops end and each file is found once (under the path
    found first: real folders before links).  Above a ``**`` the pattern's names bound the depth."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    prefix = root if not root or root.endswith("/") else root + "/"
    names = parts[first:]
    deep_from = names.index("**") if "**" in names else None
    dotted = any(name.startswith(".") for name in names[deep_from or 0:])  # may name a hidden folder below **
    matcher = _pattern_regex(names, hidden_ok=False)
    steps = [None if name == "**" else _pattern_regex([name], hidden_ok=False) for name in names]

    def may_enter(depth: int, name: str) -> bool:  # a folder `depth` levels below the root
        if deep_from is not None and depth >= deep_from:
            return dotted or not name.startswith(".")
        return depth < len(names) - 1 and steps[depth].fullmatch(name) is not None

    found, skipped = [], _Skipped()
    try:
        start = os.stat(root or ".")
    except OSError:
        return found, skipped
    if not stat.S_ISDIR(start.st_mode):
        return found, skipped
    visited = {(start.st_dev, start.st_ino)}
    queue = deque([(root or ".", "", 0)])  # (folder to list, its path below the root + "/", depth)
    while queue:
        folder, below, depth = queue.popleft()
        entries = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    budget.spend()
                    entries.append(entry)
        except OSError:
            skipped.unreadable += 1
            continue
        entries.sort(key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            kind, rel = _entry_kind(entry), below + entry.name
            if kind == "dir":
                if may_enter(depth, entry.name):
                    subfolders.append(entry)
                elif deep_from is None and matcher.fullmatch(rel):
                    skipped.folders += 1
            elif matcher.fullmatch(rel):
                if kind == "other":
                    skipped.special += 1
                elif _is_image_name(entry.name):
                    found.append(Path(prefix + rel))
                else:
                    skipped.count_file(entry.name)
        # Below a ** a folder is entered once (real folders first, so that a link to a sibling is
        # the one left out); above it the pattern's depth bounds the walk, and every path is tried.
        for entry in sorted(subfolders, key=lambda e: e.is_symlink()):
            try:
                st = entry.stat()
            except OSError:
                skipped.unreadable += 1
                continue
            if (st.st_dev, st.st_ino) in visited and deep_from is not None and depth >= deep_from:
                continue
            visited.add((st.st_dev, st.st_ino))
            queue.append((entry.path, below + entry.name + "/", depth + 1))
    return sorted(found), skipped


def _name_regex(name: str, hidden_ok: bool) -> str:
    """One file or folder name of a glob pattern as a regular expression (never matching '/')."""
    regex, i, n = "" if hidden_ok or name.startswith(".") else r"(?!\.)", 0, len(name)
    while i < n:
        ch = name[i]
        if ch == "*":
            regex, i = regex + "[^/]*", i + 1
        elif ch == "?":
            regex, i = regex + "[^/]", i + 1
        elif ch == "[":
            j = i + 1
            j += j < n and name[j] == "!"
            j += j < n and name[j] == "]"
            while j < n and name[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a plain "["
                regex, i = regex + re.escape(ch), i + 1
            else:  # a set, as fnmatch reads it, that never matches "/"
                regex, i = regex + "(?!/)" + fnmatch.translate(name[i:j + 1])[4:-3], j + 1
        else:
            regex, i = regex + re.escape(ch), i + 1
    return regex


def _pattern_regex(names: Sequence[str], hidden_ok: bool) -> "re.Pattern":
    """A glob pattern split at '/' as one regular expression over '/'-separated paths: ``**`` as a
    whole name is any number of folders (a file, when it is the last name).  Without `hidden_ok`
    a wildcard matches a name starting with '.' only where the pattern's name starts with '.'."""
    segment = "[^/]+" if hidden_ok else r"(?!\.)[^/]+"
    regex = ""
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if name == "**":
            regex += f"(?:{segment}/)*{segment}" if last else f"(?:{segment}/)*"
        else:
            regex += _name_regex(name, hidden_ok) + ("" if last else "/")
    return re.compile(regex, re.DOTALL)


def _glob_match(path: str, pattern: str) -> bool:
    """Glob matching of '/'-separated paths (an object store's): * and ? stay within one name, a
    whole ``**`` spans folders."""
    return _pattern_regex(pattern.split("/"), hidden_ok=True).fullmatch(path) is not None
