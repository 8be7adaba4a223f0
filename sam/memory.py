"""Keep freed tensor memory in the process on Linux (glibc), instead of faulting it in again.

PyTorch's CPU tensors come from malloc. glibc serves a block larger than its mmap threshold
with a fresh mmap and unmaps it at free, and hands the free top of its heap back to the system
beyond its trim threshold; both thresholds start small (128 KiB). The decoder's image-sized
temporaries (256 x 64 x 64 floats, 4 MiB) are then new pages at every call, and the first
touch of each page costs more than the arithmetic done on it, so a PerSAM decoder call is
markedly quicker with the settings below (docs/performance.md, Reusing freed memory).

`reuse_freed_memory()` raises the mmap threshold to 32 MiB (glibc's largest) and the trim
threshold to 1 GiB, so that freed blocks are reused. It changes the whole process's malloc,
so the library never calls it by itself: the `persam` command does at start, and so may a
program of yours (``from sam.memory import reuse_freed_memory; reuse_freed_memory()``).
The price is that memory freed after a peak (a ViT-H encode) stays with the process for reuse
instead of going back to the system. Nothing is changed where glibc's MALLOC_MMAP_THRESHOLD_
or MALLOC_TRIM_THRESHOLD_ (or their GLIBC_TUNABLES) is set in the environment (your own choice wins), on other C
libraries or on other systems.
"""

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses larger values on 64-bit systems
TRIM_THRESHOLD = 1 << 30
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _set_by_user() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in ENVIRONMENT) or "malloc.mmap_threshold" in tunables \
        or "malloc.trim_threshold" in tunables


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks of up to 32 MiB for reuse. True if it was set."""
    if not sys.platform.startswith("linux") or _set_by_user():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
