"""Registry of the official SAM / MobileSAM checkpoints and a resumable, verified downloader.

The downloader writes to ``FILENAME.part`` in the cache folder, resumes an interrupted
transfer with an HTTP ``Range`` request, checks size and sha256 and only then renames the
file to its final name (atomically, with :func:`os.replace`).  So a file found at the final
name is either a verified download or a file placed there by hand: it is used as it is,
without touching the network.  When its sha256 is not the registry's, it was placed by hand
(the downloader never renames an unverified file into place); it is still used, with one
:class:`UnverifiedCheckpointWarning` naming the file and its sha256, and never replaced: the
toolkit does not write over a file it did not write.  A truncated or corrupt file of that
kind is refused when it is loaded (:mod:`sam.checkpoint`).  The ``persam`` commands and
:func:`download_checkpoint` follow the same rule, through :func:`cached_checkpoint`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from tqdm import tqdm

__all__ = [
    "DownloadError",
    "ModelFile",
    "MODELS",
    "UnverifiedCheckpointWarning",
    "cached_checkpoint",
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


class UnverifiedCheckpointWarning(UserWarning):
    """The cached checkpoint's sha256 is not the registry's: a file placed by hand, used as it is."""


@dataclass(frozen=True)
class ModelFile:
    """One downloadable checkpoint."""

    model_type: str
    filename: str
    url: str
    size: Optional[int]  # bytes; None when not known
    sha256: Optional[str]  # lower-case hex digest; None skips the hash check
    family: str = "sam"  # which model it is for: "sam" (build_sam), "dinov2" (sam.dinov2.load_dinov2), "sam2" (sam.sam2.build.load_sam2)


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
    # DINOv2 backbones (GF-SAM's features; sam/dinov2.py).  Sizes and sha256 as listed by several
    # independent HuggingFace re-hosts of Meta's files (Git LFS details); none found for ViT-g/14.
    "dinov2_vits14": ModelFile(
        model_type="dinov2_vits14",
        filename="dinov2_vits14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        size=88283115,
        sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
        family="dinov2",
    ),
    "dinov2_vitb14": ModelFile(
        model_type="dinov2_vitb14",
        filename="dinov2_vitb14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        size=346378731,
        sha256="0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",
        family="dinov2",
    ),
    "dinov2_vitl14": ModelFile(
        model_type="dinov2_vitl14",
        filename="dinov2_vitl14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        size=1217586395,
        sha256="d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428",
        family="dinov2",
    ),
    "dinov2_vitg14": ModelFile(
        model_type="dinov2_vitg14",
        filename="dinov2_vitg14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth",
        size=None,  # about 4.5 GB; no digest found that could be trusted: unverified download
        sha256=None,
        family="dinov2",
    ),
    # SAM 2.1 (sam/sam2; Meta's 092824 release). No byte count or sha256 found that could be trusted
    # (no listing of Meta's files with full digests was reachable): unverified downloads.
    "sam2.1_hiera_t": ModelFile(
        model_type="sam2.1_hiera_t",
        filename="sam2.1_hiera_tiny.pt",
        url="https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
        size=None,
        sha256=None,
        family="sam2",
    ),
    "sam2.1_hiera_s": ModelFile(
        model_type="sam2.1_hiera_s",
        filename="sam2.1_hiera_small.pt",
        url="https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt",
        size=None,
        sha256=None,
        family="sam2",
    ),
    "sam2.1_hiera_b+": ModelFile(
        model_type="sam2.1_hiera_b+",
        filename="sam2.1_hiera_base_plus.pt",
        url="https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt",
        size=None,
        sha256=None,
        family="sam2",
    ),
    "sam2.1_hiera_l": ModelFile(
        model_type="sam2.1_hiera_l",
        filename="sam2.1_hiera_large.pt",
        url="https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt",
        size=None,
        sha256=None,
        family="sam2",
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


def _registry_entry(model_type: str) -> ModelFile:
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {', '.join(sorted(MODELS))}"
        ) from None


def _cache_folder(cache_dir: Union[str, os.PathLike, None]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _find_cached(
    entry: ModelFile, folder: Path, sha256_of: Callable[[Path], str]
) -> Tuple[Optional[Path], Optional[str]]:
    """(the file at the entry's final name or None, the warning to give about it or None).

    Only the downloader's verified files are renamed to the final name, so a file there whose
    sha256 differs was placed by hand: it is returned, with a warning naming it and its sha256.
    """
    final = folder / entry.filename
    if not final.exists():
        return None, None
    if not final.is_file():
        raise DownloadError(
            f"{final} is in the way: it is not a file, and the {entry.model_type} checkpoint is "
            f"kept under that name; move it elsewhere, then {_again(entry.model_type)}"
        )
    if entry.sha256 is None:
        return final, None
    got = sha256_of(final)
    if got == entry.sha256.lower():
        return final, None
    return final, (
        f"{final} is not the official {entry.model_type} checkpoint (its sha256 is {got}, the "
        f"official file's {entry.sha256}); the downloader checks what it saves, so this file was "
        f"placed there by hand and is used as it is; to use the official one instead, delete it "
        f"and {_again(entry.model_type)}"
    )


def cached_checkpoint(
    model_type: str,
    cache_dir: Union[str, os.PathLike, None] = None,
    *,
    sha256_of: Callable[[Path], str] = sha256_file,
    warn: Optional[Callable[[str], None]] = None,
) -> Optional[Path]:
    """The checkpoint of ``model_type`` in the cache, or None when there is none; never downloads.

    A file there whose sha256 is not the registry's was placed by hand (the downloader renames
    only verified files into place): it is returned all the same, with one warning that names
    it and its sha256, given to ``warn`` when set, else as an :class:`UnverifiedCheckpointWarning`.
    ``sha256_of`` hashes the file (a caller that hashes the checkpoint anyway passes its own,
    remembered one). Raises ``ValueError`` for an unknown model type and :class:`DownloadError`
    when something that is not a file is in the way.
    """
    path, warning = _find_cached(_registry_entry(model_type), _cache_folder(cache_dir), sha256_of)
    if warning is not None:
        _give_warning(warning, warn)
    return path


def _give_warning(message: str, warn: Optional[Callable[[str], None]]) -> None:
    """To ``warn`` when set, else as an UnverifiedCheckpointWarning at the public function's caller."""
    if warn is not None:
        warn(message)
    else:
        warnings.warn(UnverifiedCheckpointWarning(message), stacklevel=3)


def _again(model_type: str) -> str:
    return f"run `persam download {model_type}` again"


def _by_hand(entry: ModelFile, part: Path) -> str:
    """Where a checkpoint downloaded by hand must go (the cache folder being written to; the
    final name is free, else the cached file would have been used)."""
    flag = "--dinov2-checkpoint" if entry.family == "dinov2" else "--checkpoint"
    return (
        f"or download {entry.url} by hand and save it as {part.with_name(entry.filename)} "
        f"(or pass it with {flag} FILE)"
    )


def _one_line(exc: BaseException) -> str:
    """The first clause of an error's message (what is wrong, without the loader's advice)."""
    text = str(exc).strip()
    return text.splitlines()[0].split("; ")[0] if text else type(exc).__name__


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
    warn: Optional[Callable[[str], None]] = None,
    check_fits: Optional[Callable[[str, Path], None]] = None,
) -> Path:
    """Return the local path of the checkpoint for ``model_type``, downloading it if needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`; ``url`` overrides the registry URL
    (the expected size and sha256 stay those of the registry entry).
    A file already in the cache under the checkpoint's name is returned without touching the
    network; one whose sha256 is not the registry's was placed there by hand and is returned
    too, with one warning naming it and its sha256, given to ``warn`` when set, else as an
    :class:`UnverifiedCheckpointWarning` (see :func:`cached_checkpoint`; it is never replaced).
    Raises :class:`DownloadError` on network errors, truncated transfers and hash/size
    mismatches, and ``ValueError`` for an unknown model type.

    For an entry without a known sha256, ``check_fits(model_type, path)`` (for example
    :func:`sam.checkpoint_fit.check_checkpoint_fits`) is the check instead: a download it raises on
    is deleted and refused.  Such a download is published with one warning giving its sha256, so
    that the user can compare it with a source they trust.
    """
    entry = _registry_entry(model_type)
    url = url or entry.url
    folder = _cache_folder(cache_dir)
    final = folder / entry.filename
    part = folder / (entry.filename + ".part")

    found, warning = _find_cached(entry, folder, sha256_file)
    if found is not None:
        if warning is not None:
            _give_warning(warning, warn)
        return found
    folder.mkdir(parents=True, exist_ok=True)

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
    _check_and_publish(entry, url, part, final, check_fits)
    if entry.sha256 is None:
        _give_warning(
            f"{final}: no published sha256 of the {entry.model_type} checkpoint is known to this "
            f"toolkit, so the download was checked by {'loading it into the model' if check_fits else 'its transfer only'}; "
            f"its sha256 is {sha256_file(final)}",
            warn,
        )
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


def _check_and_publish(entry: ModelFile, url: str, part: Path, final: Path,
                       check_fits: Optional[Callable[[str, Path], None]] = None) -> None:
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
    elif check_fits is not None:
        try:
            check_fits(entry.model_type, part)
        except Exception as exc:  # the check's one-line CheckpointError, or anything a bad file raises
            part.unlink()
            raise DownloadError(
                f"download of {url} is not a {entry.model_type} checkpoint ({_one_line(exc)}); "
                f"the partial file was deleted; {_again(entry.model_type)} "
                f"(if it keeps failing, the server is serving a different file)"
            ) from None
    os.replace(part, final)
