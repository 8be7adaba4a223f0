"""The lock on an output folder: one run at a time (:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Sequence

from persam.errors import InputError, SettingError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): no folder lock
    fcntl = None

LOCK_FILE = ".persam.lock"


@contextlib.contextmanager
def output_lock(folder) -> Iterator[None]:
    """Hold `folder` exclusively while the block runs; InputError when another run holds it.

    An advisory ``fcntl.flock`` on ``folder/.persam.lock`` (which names the holder's pid).  The
    kernel drops the lock when its process ends in any way, so a killed run never blocks the
    next one; the file is removed when the block ends (a run killed with SIGKILL leaves it,
    unlocked, and the next run takes it over).  Without fcntl (not POSIX) there is no lock.

    The folder (and missing folders above it) is made here; the ones made here are removed again
    when the block leaves them empty (a run refused or failed before writing anything)."""
    folder = Path(folder)
    if fcntl is None:  # pragma: no cover
        yield
        return
    made = [f for f in (folder, *folder.parents) if not os.path.lexists(f)]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(made)
        raise InputError(f"cannot create output folder {folder} ({exc.strerror or exc})") from None
    path = folder / LOCK_FILE
    try:
        fd = _lock_file(path, folder)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked here: a run waiting on this file sees it gone and retries
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove each of `folders` (deepest first) while it is empty."""
    for f in folders:
        try:
            os.rmdir(f)
        except OSError:  # not empty (the run's outputs, another run's lock), or gone
            return


def _lock_file(path: Path, folder: Path) -> int:
    """Open and flock `path` (created if missing); the open, locked file descriptor."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"cannot lock output folder {folder} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SettingError(
                    f"another persam run{holder} is writing to {folder}; wait for it to finish or use another {{out}}",
                    "out") from None
            raise InputError(f"cannot lock output folder {folder} ({exc.strerror or exc})") from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:  # a full disk: leave no lock file behind
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
                raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
            return fd
        os.close(fd)  # the run that held it removed the file after we opened it: lock the new one


def _lock_holder(fd: int) -> str:
    """' (pid N)' from a lock file, or '' when it names none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
