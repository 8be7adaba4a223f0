"""Registry of the official SAM / MobileSAM checkpoints and a resumable, verified downloader.

The downloader writes to ``FILENAME.part`` in the cache folder, resumes an interrupted
transfer with an HTTP ``Range`` request, checks size and sha256 and only then renames the
file to its final name (atomically, with :func:`os.replace`).  A file found at the final
name is reused when its sha256 matches, without touching the network.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from tqdm import tqdm

__all__ = [
    "DownloadError",
    "ModelFile",
    "MODELS",
    "default_cache_dir",
    "download_checkpoint",
    "verify_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB
_TIMEOUT_S = 60.0
_USER_AGENT = "persam-downloader/0.1"


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or failed verification."""


@dataclass(frozen=True)
class ModelFile:
    """One downloadable checkpoint."""

    model_type: str
    filename: str
    url: str
    size: Optional[int]  # bytes; None when not known
    sha256: Optional[str]  # lower-case hex digest; None skips the hash check


MODELS: dict[str, ModelFile] = {
    "vit_h": ModelFile(
        model_type="vit_h",
        filename="sam_vit_h_4b8939.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        size=2564550879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "vit_l": ModelFile(
        model_type="vit_l",
        filename="sam_vit_l_0b3195.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        size=None,  # about 1.25 GB; exact byte count not recorded
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_b": ModelFile(
        model_type="vit_b",
        filename="sam_vit_b_01ec64.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        size=375042383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_t": ModelFile(
        model_type="vit_t",
        filename="mobile_sam.pt",
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        size=40728226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    ),
}


def default_cache_dir() -> Path:
    """``$PERSAM_CACHE`` when set (and not empty), else ``~/.cache/persam``."""
    env = os.environ.get("PERSAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "persam"


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Union[str, os.PathLike], sha256: str) -> bool:
    """True when ``path`` is a regular file whose sha256 equals ``sha256`` (case-insensitive)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        return sha256_file(p) == sha256.strip().lower()
    except OSError:
        return False


def _again(model_type: str) -> str:
    return f"run `persam download {model_type}` again"


def _by_hand(entry: ModelFile, part: Path) -> str:
    """Where a checkpoint downloaded by hand must go (the cache folder being written to)."""
    return (
        f"or download {entry.url} by hand and save it as {part.with_name(entry.filename)} "
        f"(or pass it with --checkpoint FILE)"
    )


def _describe_net_error(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return str(reason) if not isinstance(reason, BaseException) else (str(reason) or type(reason).__name__)
    return str(exc) or type(exc).__name__


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def download_checkpoint(
    model_type: str,
    cache_dir: Union[str, os.PathLike, None] = None,
    url: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Return the local path of the checkpoint for ``model_type``, downloading it if needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``url`` overrides the registry URL
    (the expected size and sha256 stay those of the registry entry).
    Raises :class:`DownloadError` on network errors, truncated transfers and hash/size
    mismatches, and ``ValueError`` for an unknown model type.
    """
    try:
        entry = MODELS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {', '.join(sorted(MODELS))}"
        ) from None
    url = url or entry.url
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / entry.filename
    part = folder / (entry.filename + ".part")

    if final.is_file():
        if entry.sha256 is None or verify_checkpoint(final, entry.sha256):
            return final
        logger.warning("%s does not match its sha256; downloading it again", final)

    # A partial download that is already complete (e.g. the rename was interrupted).
    if part.is_file() and entry.size is not None and part.stat().st_size >= entry.size:
        if part.stat().st_size == entry.size and (
            entry.sha256 is None or verify_checkpoint(part, entry.sha256)
        ):
            os.replace(part, final)
            return final
        part.unlink()

    try:
        _fetch(entry, url, part, progress)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and part.exists():
            # The server refuses our resume offset; the partial file is unusable.
            part.unlink()
            _fetch(entry, url, part, progress)
        else:
            raise
    _check_and_publish(entry, url, part, final)
    return final


def _open(url: str, offset: int):
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=_TIMEOUT_S)


def _fetch(entry: ModelFile, url: str, part: Path, progress: bool) -> None:
    """Download (or resume) ``url`` into ``part``. Leaves a truncated ``part`` for a later resume.

    Re-raises HTTP 416 (range not satisfiable) untouched so that the caller can restart.
    """
    offset = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, offset)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise
        raise DownloadError(
            f"could not download {url}: {_describe_net_error(exc)}; "
            f"check the URL and your network connection, then {_again(entry.model_type)}; "
            f"{_by_hand(entry, part)}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(
            f"could not download {url}: {_describe_net_error(exc)}; "
            f"check the URL and your network connection, then {_again(entry.model_type)}; "
            f"{_by_hand(entry, part)}"
        ) from None

    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "") or "")
            if m is not None and int(m.group(1)) != offset:
                # The server resumed from somewhere else: start over cleanly.
                resp.close()
                part.unlink()
                return _fetch(entry, url, part, progress)
        elif offset:
            # 200: the server ignored the Range header and sends the whole file.
            logger.info("server ignored the resume request; restarting %s from zero", url)
            offset = 0
        length_header = resp.headers.get("Content-Length")
        remaining = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + remaining if remaining is not None else entry.size

        received = 0
        mode = "ab" if offset else "wb"
        with open(part, mode) as f, tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=entry.filename,
            disable=not progress,
            leave=False,
        ) as bar:
            try:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise DownloadError(
                    f"download of {url} was interrupted after {offset + received} bytes "
                    f"({_describe_net_error(exc)}); {_again(entry.model_type)} to resume it"
                ) from None

    if remaining is not None and received < remaining:
        raise DownloadError(
            f"download of {url} was cut short: the connection closed after "
            f"{offset + received} of {offset + remaining} bytes; "
            f"{_again(entry.model_type)} to resume it"
        )


def _check_and_publish(entry: ModelFile, url: str, part: Path, final: Path) -> None:
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink()
        raise DownloadError(
            f"download of {url} has the wrong size: got {size} bytes, expected {entry.size}; "
            f"the partial file was deleted; {_again(entry.model_type)} "
            f"(if it keeps failing, the server is serving a different file)"
        )
    if entry.sha256 is not None:
        got = sha256_file(part)
        if got != entry.sha256.lower():
            part.unlink()
            raise DownloadError(
                f"download of {url} is corrupt: sha256 {got} does not match the expected "
                f"{entry.sha256}; the partial file was deleted; {_again(entry.model_type)} "
                f"(if it keeps failing, the server is serving a different file)"
            )
    os.replace(part, final)
