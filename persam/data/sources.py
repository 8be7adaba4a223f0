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
read any of them.  The local listing and its limits are :mod:`persam.data.listing`'s, the URIs
:mod:`persam.data.uri_sources`'s.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from persam.data.listing import (_GLOB_CHARS, IMAGE_EXTENSIONS, ExpansionLimits, Note, _Budget, _file_kind,
                                 _glob_local, _is_regular, _list_folder, _recursive_hint)
from persam.data.uri_sources import UriPath, _one_line, _pyarrow_fs, expand_uri, is_uri
from persam.errors import InputError

__all__ = ["LIST_SUFFIXES", "PARQUET_SUFFIXES", "expand_sources", "expand_targets", "image_sha256", "load_image",
           "read_image_bytes", "image_stat"]

LIST_SUFFIXES = (".txt", ".lst", ".list")
PARQUET_SUFFIXES = (".parquet", ".pq")
PATH_COLUMNS = ("path", "image", "uri", "file")
_CHUNK = 1 << 20

ImagePath = Union[Path, UriPath]


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
    """RGB uint8 image from a local path or a URI (see :func:`persam.data.io.load_image`); with `data`
    decoded from those bytes (already read)."""
    from persam.data import io

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
        """An object-store URI's images (:func:`persam.data.uri_sources.expand_uri`)."""
        found, messages = expand_uri(uri, budget)
        if found is None:
            self._missing(uri, listed_in)
            return
        self.add(found)
        self.messages.extend(messages)


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

