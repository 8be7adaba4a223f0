"""SOURCEs named by URIs (s3://, gs://, file://, hdfs://...): :class:`UriPath`, an image or folder
read through ``pyarrow.fs``, and the listing of a URI folder or glob pattern
(see :mod:`persam.data.sources` for what a SOURCE is).

pyarrow is needed only here and for parquet files: ``pip install 'persam[ray]'``.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple

from persam.data.listing import _GLOB_CHARS, IMAGE_EXTENSIONS, _Budget, _glob_match, _is_image_name, _Skipped
from persam.errors import InputError

__all__ = ["UriPath", "expand_uri", "is_uri"]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def expand_uri(uri: str, budget: _Budget) -> Tuple[Optional[List[UriPath]], List[str]]:
    """An object-store URI's images: a folder's (sorted), a glob's (sorted) or the one file; and
    the messages (warnings and notes).  None for the images when the URI names nothing."""
    pafs = _pyarrow_fs()
    messages: List[str] = []
    scheme, _, rest = uri.partition("://")
    glob_at = next((i for i, ch in enumerate(rest) if ch in _GLOB_CHARS), None)
    if glob_at is None:
        target = UriPath(uri)
        info = target.info()
        if info.type == pafs.FileType.NotFound:
            return None, messages
        if info.type != pafs.FileType.Directory:
            return [target], messages
        files, skipped = _list(target, recursive=False, budget=budget)
        found = [f for f in files if _is_image_name(f.name)]
        for f in files:
            if not _is_image_name(f.name):
                skipped.count_file(f.name)
        if not found:
            messages.append(f"folder {uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        note = skipped.note(f"folder {uri}", f"{uri.rstrip('/')}/**/*")
        if note:
            messages.append(note)
        return found, messages
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
    if not found:
        messages.append(f"pattern {uri} matches no images")
    note = skipped.note(f"pattern {uri}", "")
    if note:
        messages.append(note)
    return found, messages


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
