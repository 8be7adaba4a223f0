"""SOURCE: where the target images of `persam segment / apply` come from, for every engine.

A SOURCE (each TARGET argument) is one of

    photos/                       a folder: its images, sorted (not recursive: a note counts the
                                  subfolders and the files of other formats it skipped)
    'photos/**/*.jpg'             a glob pattern: the matching images, sorted (each folder is
                                  listed once, also when symbolic links lead back to it)
    photos/01.jpg                 one image
    list.txt                      a text file of image paths (or URIs, folders, globs), one a line;
                                  blank lines and lines starting with # are skipped
    table.parquet                 a parquet file with a path column (``path``, else ``image``, ``uri``
                                  or ``file``, else its only string column)
    s3://bucket/photos/, gs://bucket/x.jpg, file:///data/photos/*.jpg
                                  object-store or file URIs that pyarrow's file systems read
                                  (folder, glob or one image, as above)

A relative path inside a text or parquet file is relative to that file's folder.  Local
images are :class:`pathlib.Path` objects; URIs become :class:`UriPath`, which reads through
``pyarrow.fs`` (pyarrow is needed only for URIs and parquet files: ``pip install 'persam[ray]'``).
An image is a regular file named with one of :data:`IMAGE_EXTENSIONS` (a GIF: its first frame);
a target that does not exist is an error, one that is not a regular file (a FIFO) is skipped with
a note, and the listing of one SOURCE is bounded (:class:`ExpansionLimits`).

:func:`expand_sources` is the one place where SOURCEs are expanded, for the command line and both
engines, and :func:`expand_targets` (local files, folders and patterns only) is the same code for
the page's server folders; :func:`read_image_bytes`, :func:`load_image` and :func:`image_sha256`
read any of them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .io import InputError

__all__ = ["IMAGE_EXTENSIONS", "LIST_SUFFIXES", "PARQUET_SUFFIXES", "ExpansionLimits", "Note", "UriPath",
           "expand_sources", "expand_targets", "image_sha256", "is_uri", "load_image", "read_image_bytes",
           "image_stat"]

# What a folder or a pattern takes as images (Pillow reads them all; of a GIF, the first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIXES = (".parquet", ".pq")
PATH_COLUMNS = ("path", "image", "uri", "file")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = set("*?[")
_CHUNK = 1 << 20

ImagePath = Union[Path, "UriPath"]


def is_uri(text: str) -> bool:
    """True for 'scheme://...' (s3://, gs://, file://, hdfs://...)."""
    return bool(_URI.match(str(text)))


def _pyarrow_fs():
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise InputError("reading URIs and parquet files needs pyarrow: pip install 'persam[ray]' "
                         "(or pip install pyarrow)") from None
    return pafs


class UriPath:
    """An image (or folder) named by a URI, read through ``pyarrow.fs``.

    Offers what the batch runner asks of a path: ``name``, ``stem``, ``suffix``, ``parent``,
    ``resolve()`` (itself), ``parents`` (a file:// URI's local folders), ``exists()``, ``is_file()``;
    ``str()`` is the URI.  Not ``os.PathLike``: nothing opens it as a local file by mistake.
    The file's size and modification time are remembered once known (from a listing)."""

    __slots__ = ("uri", "_path", "_info")

    def __init__(self, uri: str, info=None) -> None:
        self.uri = str(uri)
        scheme, _, rest = self.uri.partition("://")
        self._path = PurePosixPath("/" + rest.split("?", 1)[0].lstrip("/"))
        self._info = info  # pyarrow FileInfo, or None until asked

    # path-like names
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"UriPath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UriPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __fspath__(self):  # pragma: no cover - guard: never a local path
        raise TypeError(f"{self.uri} is a URI, not a local path")

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def parent(self) -> "UriPath":
        head = self.uri[: len(self.uri) - len(self.name)].rstrip("/") if self.name else self.uri
        return UriPath(head)

    def resolve(self) -> "UriPath":
        return self

    @property
    def parents(self) -> Tuple[Path, ...]:
        """The local folders holding a file:// image (so that it is seen inside --out); else none."""
        local = self.local_path()
        return tuple(local.resolve().parents) if local is not None else ()

    def local_path(self) -> Optional[Path]:
        if self.uri.lower().startswith("file://"):
            return Path(self._path)
        return None

    # file system
    def filesystem(self):
        """(pyarrow FileSystem, path inside it)."""
        pafs = _pyarrow_fs()
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as exc:  # ArrowInvalid, ArrowNotImplemented, missing credentials...
            raise InputError(f"image {self.uri}: cannot open its file system ({_one_line(exc)})") from None

    def info(self):
        if self._info is None:
            fs, path = self.filesystem()
            try:
                self._info = fs.get_file_info(path)
            except Exception as exc:
                raise InputError(f"image {self.uri}: {_one_line(exc)}") from None
        return self._info

    def exists(self) -> bool:
        try:
            return self.info().type.name != "NotFound"
        except InputError:
            return False

    def is_file(self) -> bool:
        try:
            return self.info().type.name == "File"
        except InputError:
            return False

    def open_input(self):
        fs, path = self.filesystem()
        return fs.open_input_stream(path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# --------------------------------------------------------------------------------------------
# reading


def read_image_bytes(path: ImagePath) -> bytes:
    """The bytes of an image file (local or URI); InputError naming it when it cannot be read."""
    if isinstance(path, UriPath):
        if not path.exists():
            raise InputError(f"image {path}: file not found")
        try:
            with path.open_input() as stream:
                return stream.read()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"image {path}: cannot read ({_one_line(exc)})") from None
    p = Path(path)
    _check_regular(p)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"image {p}: cannot read ({exc.strerror or exc})") from None


def load_image(path: ImagePath, data: Optional[bytes] = None) -> np.ndarray:
    """RGB uint8 image from a local path or a URI (see :func:`persam.io.load_image`); with `data`
    decoded from those bytes (already read)."""
    from . import io

    if data is None and not isinstance(path, UriPath):
        _check_regular(Path(path))
        return io.load_image(path)
    return io.load_image(path, data=read_image_bytes(path) if data is None else data)


def _check_regular(p: Path) -> None:
    """InputError unless `p` is a regular file (reading a FIFO would wait for a writer for ever)."""
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"image {p}: file not found") from None
    except OSError as exc:
        raise InputError(f"image {p}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"image {p}: is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise InputError(f"image {p}: not a regular file ({_file_kind(mode)})")


def image_sha256(path: ImagePath) -> Optional[str]:
    """Hex sha256 of an image file (local or URI); None when it cannot be read."""
    if not isinstance(path, UriPath):
        from sam.download import sha256_file

        try:
            return sha256_file(path) if Path(path).is_file() else None
        except OSError:
            return None
    digest = hashlib.sha256()
    try:
        if not path.is_file():
            return None
        with path.open_input() as stream:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
    except Exception:
        return None
    return digest.hexdigest()


def image_stat(path: ImagePath) -> Optional[List[int]]:
    """[size in bytes, modification time in ns] of an image file, or None (unknown / unreadable):
    with the path, what tells a file recorded by an earlier run without reading it again."""
    try:
        if isinstance(path, UriPath):
            info = path.info()
            if info.type.name != "File" or info.size is None or info.mtime_ns is None:
                return None
            return [int(info.size), int(info.mtime_ns)]
        st = Path(path).stat()
        return [int(st.st_size), int(st.st_mtime_ns)]
    except (OSError, InputError):
        return None


# --------------------------------------------------------------------------------------------
# expanding SOURCEs


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


def expand_sources(specs: Sequence[str], limits: Optional[ExpansionLimits] = None
                   ) -> Tuple[List[ImagePath], List[str]]:
    """Image paths named by `specs` (see the module doc), without duplicates, and messages: warnings
    for specs that name nothing, and :class:`Note`s for what a folder or pattern skipped.

    InputError (one line) for a target that does not exist (a file, folder or URI named on its own
    or in a text or parquet file), for a text or parquet file that cannot be read, and for a SOURCE
    whose listing passes `limits`.  A folder reached twice (a symbolic link) is listed once, and
    only regular files are taken (a FIFO would block its reader)."""
    return _Expansion(limits, lists=True).run(specs)


def expand_targets(specs: Sequence[str], limits: Optional[ExpansionLimits] = None
                   ) -> Tuple[List[Path], List[str]]:
    """Local image paths named by `specs`: files, folders (their images, sorted), glob patterns
    (the matching images, sorted); no text or parquet files, no URIs (what the page reads from
    server folders).  Messages and limits as :func:`expand_sources`; a path that does not exist is
    kept, for the caller to report."""
    return _Expansion(limits, lists=False).run(specs)


class _Expansion:
    """One expansion: the paths found (each once), the messages, the targets that do not exist."""

    def __init__(self, limits: Optional[ExpansionLimits], lists: bool) -> None:
        self.limits = limits or ExpansionLimits()
        self.lists = lists  # text and parquet files and URIs are read; a missing target is an error
        self.paths: List[ImagePath] = []
        self.messages: List[str] = []
        self.missing: List[str] = []
        self.seen: set = set()

    def run(self, specs: Sequence[str]):
        for spec in specs:
            self.expand(str(spec), None, None, _Budget(str(spec), self.limits))
        if self.missing:
            first = self.missing[0]
            more = f" (and {len(self.missing) - 1} more: {', '.join(self.missing[1:4])}" \
                   f"{', ...' if len(self.missing) > 4 else ''})" if len(self.missing) > 1 else ""
            raise InputError(f"target {first}: no such file or folder{more}")
        return self.paths, self.messages

    def add(self, found: Sequence[ImagePath]) -> None:
        for p in found:
            key = str(p) if isinstance(p, UriPath) else (str(p.resolve()) if p.exists() else str(p))
            if key not in self.seen:
                self.seen.add(key)
                self.paths.append(p)

    def expand(self, spec: str, base: Optional[Path], listed_in: Optional[Path], budget: _Budget) -> None:
        budget.source = spec if listed_in is None else f"{spec} (listed in {listed_in})"  # for its message
        if self.lists and is_uri(spec):
            local = UriPath(spec).local_path() if spec.lower().startswith("file://") else None
            if local is None:
                self._expand_uri(spec, budget, listed_in)
            else:  # through the local walker: symbolic links and FIFOs are handled there
                self._expand_local(spec, local, budget, listed_in, lambda q: UriPath(f"file://{q}"))
            return
        p = Path(spec).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        suffix = p.suffix.lower()
        if self.lists and listed_in is None and suffix in LIST_SUFFIXES + PARQUET_SUFFIXES and _is_regular(p):
            entries = _read_list(p) if suffix in LIST_SUFFIXES else _read_parquet(p)
            if not entries:
                self.messages.append(f"{p} lists no images")
            for entry in entries:
                self.expand(entry, p.parent, p, budget)
            return
        self._expand_local(spec, p, budget, listed_in, lambda q: q)

    def _missing(self, name: str, listed_in: Optional[Path]) -> None:
        self.missing.append(f"{name} (listed in {listed_in})" if listed_in is not None else name)

    def _expand_local(self, spec: str, p: Path, budget: _Budget, listed_in: Optional[Path], wrap) -> None:
        """A local file, folder or glob pattern; `wrap` makes each path found what is returned."""
        if _GLOB_CHARS & set(spec) and not os.path.lexists(p):
            found, skipped = _glob_local(str(p), budget)
            self.add([wrap(q) for q in found])
            if not found:
                self.messages.append(f"pattern {spec} matches no images")
            note = skipped.note(f"pattern {spec}", _recursive_hint(spec))
            if note:
                self.messages.append(note)
            return
        try:
            mode = os.stat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if self.lists:
                self._missing(str(wrap(p)), listed_in)
            else:
                self.add([p])
            return
        except OSError as exc:  # a loop of symbolic links, no permission to look
            raise InputError(f"target {wrap(p)}: cannot read ({exc.strerror or exc})") from None
        if stat.S_ISDIR(mode):
            found, skipped = _list_folder(p, budget)
            self.add([wrap(q) for q in found])
            if not found:
                self.messages.append(f"folder {wrap(p)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            note = skipped.note(f"folder {wrap(p)}", f"{wrap(p / '**' / '*')}")
            if note:
                self.messages.append(note)
        elif stat.S_ISREG(mode):
            self.add([wrap(p)])
        else:
            self.messages.append(Note(f"skipping {wrap(p)}: not a regular file ({_file_kind(mode)})"))

    def _expand_uri(self, uri: str, budget: _Budget, listed_in: Optional[Path]) -> None:
        """An object-store URI's images: a folder's (sorted), a glob's (sorted) or the one file."""
        pafs = _pyarrow_fs()
        scheme, _, rest = uri.partition("://")
        glob_at = next((i for i, ch in enumerate(rest) if ch in _GLOB_CHARS), None)
        if glob_at is None:
            target = UriPath(uri)
            info = target.info()
            if info.type == pafs.FileType.NotFound:
                self._missing(uri, listed_in)
            elif info.type == pafs.FileType.Directory:
                files, skipped = _list(target, recursive=False, budget=budget)
                found = [f for f in files if _is_image_name(f.name)]
                for f in files:
                    if not _is_image_name(f.name):
                        skipped.count_file(f.name)
                self.add(found)
                if not found:
                    self.messages.append(f"folder {uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
                note = skipped.note(f"folder {uri}", f"{uri.rstrip('/')}/**/*")
                if note:
                    self.messages.append(note)
            else:
                self.add([target])
            return
        folder = rest[:glob_at].rsplit("/", 1)[0]
        base = UriPath(f"{scheme}://{folder}")
        recursive = "**" in rest or "/" in rest[len(folder) + 1:]
        files, skipped = (_list(base, recursive=recursive, budget=budget)
                          if base.info().type == pafs.FileType.Directory else ([], _Skipped()))
        prefix = f"{scheme}://"
        matching = [f for f in files if _glob_match(f.uri[len(prefix):], rest)]
        found = [f for f in matching if _is_image_name(f.name)]
        for f in matching:
            if not _is_image_name(f.name):
                skipped.count_file(f.name)
        skipped.folders = 0  # a pattern's folders are not "not searched"
        self.add(found)
        if not found:
            self.messages.append(f"pattern {uri} matches no images")
        note = skipped.note(f"pattern {uri}", "")
        if note:
            self.messages.append(note)


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


def _read_list(path: Path) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"list of images {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_parquet(path: Path) -> List[str]:
    _pyarrow_fs()  # the install hint when pyarrow is missing
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise InputError(f"parquet file {path}: cannot read ({_one_line(exc)})") from None
    names = table.column_names
    column = next((c for c in PATH_COLUMNS if c in names), None)
    if column is None:
        strings = [f.name for f in table.schema if pat.is_string(f.type) or pat.is_large_string(f.type)]
        if len(strings) != 1:
            raise InputError(f"parquet file {path}: no path column (one of {', '.join(PATH_COLUMNS)}, or a single "
                             f"string column); its columns: {', '.join(names) or 'none'}")
        column = strings[0]
    values = table.column(column).to_pylist()
    bad = [v for v in values if v is not None and not isinstance(v, str)]
    if bad:
        raise InputError(f"parquet file {path}: column {column!r} holds {type(bad[0]).__name__} values, not paths")
    return [v.strip() for v in values if v and v.strip()]


def _list(folder: UriPath, recursive: bool, budget: _Budget) -> Tuple[List[UriPath], _Skipped]:
    """The files under a URI folder, sorted by URI, with their sizes and times remembered; and
    the subfolders left out (not `recursive`)."""
    pafs = _pyarrow_fs()
    fs, path = folder.filesystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except Exception as exc:
        raise InputError(f"cannot list {folder}: {_one_line(exc)}") from None
    budget.spend(len(infos))
    # the URI of each file: the folder's URI with the part below the listed folder appended
    out, skipped = [], _Skipped()
    for info in infos:
        if info.type == pafs.FileType.Directory:
            skipped.folders += not recursive and not info.base_name.startswith(".")
        elif info.type != pafs.FileType.File:
            skipped.special += 1
        else:
            below = info.path[len(path):].lstrip("/") if info.path.startswith(path) else info.base_name
            out.append(UriPath(f"{folder.uri.rstrip('/')}/{below}", info))
    return sorted(out, key=lambda u: u.uri), skipped
