"""SOURCE: where the target images of `persam segment / apply` come from, for every engine.

A SOURCE (each TARGET argument) is one of

    photos/                       a folder: its images, sorted (not recursive)
    'photos/**/*.jpg'             a glob pattern: the matching images, sorted
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
:func:`expand_sources` is the one place where SOURCEs are expanded; :func:`read_image_bytes`,
:func:`load_image` and :func:`image_sha256` read any of them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .io import InputError

__all__ = ["LIST_SUFFIXES", "PARQUET_SUFFIXES", "UriPath", "expand_sources", "image_sha256", "is_uri",
           "load_image", "read_image_bytes", "image_stat"]

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
    if not p.exists():
        raise InputError(f"image {p}: file not found")
    if p.is_dir():
        raise InputError(f"image {p}: is a folder, not an image file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"image {p}: cannot read ({exc.strerror or exc})") from None


def load_image(path: ImagePath, data: Optional[bytes] = None) -> np.ndarray:
    """RGB uint8 image from a local path or a URI (see :func:`persam.io.load_image`); with `data`
    decoded from those bytes (already read)."""
    from . import io

    if data is None and not isinstance(path, UriPath):
        return io.load_image(path)
    return io.load_image(path, data=read_image_bytes(path) if data is None else data)


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


def _is_image_name(name: str) -> bool:
    from .run import IMAGE_EXTENSIONS

    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def expand_sources(specs: Sequence[str]) -> Tuple[List[ImagePath], List[str]]:
    """Image paths named by `specs` (see the module doc), without duplicates, and warnings for
    specs that name nothing.  A file or URI that does not exist is kept (reported as an error
    when it is loaded).  InputError for a text or parquet file that cannot be read."""
    from .run import expand_targets

    paths: List[ImagePath] = []
    warnings: List[str] = []
    seen = set()

    def add(found: Sequence[ImagePath]) -> None:
        for p in found:
            key = str(p) if isinstance(p, UriPath) else (str(p.resolve()) if p.exists() else str(p))
            if key not in seen:
                seen.add(key)
                paths.append(p)

    def expand(spec: str, base: Optional[Path], nested: bool) -> None:
        if is_uri(spec):
            found, warning = _expand_uri(spec)
            add(found)
            warnings.extend([warning] if warning else [])
            return
        p = Path(spec).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        suffix = p.suffix.lower()
        if not nested and p.is_file() and suffix in LIST_SUFFIXES + PARQUET_SUFFIXES:
            entries = _read_list(p) if suffix in LIST_SUFFIXES else _read_parquet(p)
            if not entries:
                warnings.append(f"{p} lists no images")
            for entry in entries:
                expand(entry, p.parent, nested=True)
            return
        found, more = expand_targets([str(p)])
        add(found)
        warnings.extend(more)

    for spec in specs:
        expand(str(spec), None, nested=False)
    return paths, warnings


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


def _expand_uri(uri: str) -> Tuple[List[UriPath], Optional[str]]:
    """A URI's images: a folder's (sorted), a glob's (sorted) or the one file; and a warning."""
    pafs = _pyarrow_fs()
    scheme, _, rest = uri.partition("://")
    glob_at = next((i for i, ch in enumerate(rest) if ch in _GLOB_CHARS), None)
    if glob_at is None:
        target = UriPath(uri)
        info = target.info()
        if info.type == pafs.FileType.Directory:
            files = _list(target, recursive=False)
            found = [f for f in files if _is_image_name(f.name)]
            return found, None if found else f"folder {uri} holds no images"
        return [target], None  # a file, or missing (reported when it is loaded)
    folder = rest[:glob_at].rsplit("/", 1)[0]
    pattern = rest
    base = UriPath(f"{scheme}://{folder}")
    recursive = "**" in pattern or "/" in rest[len(folder) + 1:]
    files = _list(base, recursive=recursive) if base.info().type == pafs.FileType.Directory else []
    prefix = f"{scheme}://"
    found = [f for f in files if _is_image_name(f.name) and _glob_match(f.uri[len(prefix):], pattern)]
    return found, None if found else f"pattern {uri} matches no images"


def _glob_match(path: str, pattern: str) -> bool:
    """fnmatch where * and ? stay within one folder and ** spans folders."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                regex, i = regex + re.escape("["), i + 1
            else:
                regex, i = regex + fnmatch.translate(pattern[i:end + 1])[4:-3], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, path) is not None


def _list(folder: UriPath, recursive: bool) -> List[UriPath]:
    """The files under a URI folder, sorted by URI, with their sizes and times remembered."""
    pafs = _pyarrow_fs()
    fs, path = folder.filesystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except Exception as exc:
        raise InputError(f"cannot list {folder}: {_one_line(exc)}") from None
    # the URI of each file: the folder's URI with the part below the listed folder appended
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        below = info.path[len(path):].lstrip("/") if info.path.startswith(path) else info.base_name
        out.append(UriPath(f"{folder.uri.rstrip('/')}/{below}", info))
    return sorted(out, key=lambda u: u.uri)
