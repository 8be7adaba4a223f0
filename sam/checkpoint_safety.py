"""What a pickled checkpoint that ``torch.load(weights_only=True)`` refused would run: the
globals its pickles import, read from their opcodes (never by unpickling), less those torch
allows in a weights-only load.  :mod:`sam.checkpoint` names them in its refusal.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Dict, List

__all__ = ["code_in_pickle"]

# How much of a pickle that torch refused is read to name what it imports (torch.save's zip
# stores the pickle apart from the tensors, so this is all of it; a legacy file starts with it).
_PICKLE_SCAN_BYTES = 64 << 20
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
_SAFE_FALLBACK = ("torch.", "collections.OrderedDict", "_codecs.encode")
_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def code_in_pickle(path: Path, exc: BaseException) -> List[str]:
    """What a pickle that ``torch.load(weights_only=True)`` refused would import and call beyond
    weights: the globals named in torch's message, or read from the pickle's opcodes (without
    running them), less those torch allows. Empty when none are found (a damaged file)."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    try:
        names += _pickle_globals(path)
    except Exception:  # noqa: BLE001 - an unreadable pickle is reported as damaged, not as code
        pass
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private helper: fall back to torch's own names
        allowed = set()
    found: List[str] = []
    for name in names:
        if not _DOTTED_NAME.match(name) or name in allowed or name.startswith(_SAFE_FALLBACK) or name in found:
            continue
        found.append(name)
    return found


def _pickle_streams(path: Path) -> List[bytes]:
    if zipfile.is_zipfile(path):  # torch.save: <archive>/data.pkl beside the tensor data
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n)[:_PICKLE_SCAN_BYTES] for n in archive.namelist() if n.endswith("data.pkl")][:1]
    with open(path, "rb") as f:  # a plain pickle, or legacy torch.save: a few pickles, then tensor data
        return [f.read(_PICKLE_SCAN_BYTES)]


def _pickle_globals(path: Path) -> List[str]:
    """``module.name`` of every global the pickles of ``path`` import, read from their opcodes."""
    names: List[str] = []
    for data in _pickle_streams(path):
        stream = io.BytesIO(data)
        for _ in range(8):  # successive pickles (legacy torch.save writes five before its data)
            if stream.tell() >= len(data):
                break
            try:
                names += _globals_of_one_pickle(stream)
            except Exception:  # noqa: BLE001 - the bytes after the pickles are not pickles
                break
    return names


def _globals_of_one_pickle(stream: io.BytesIO) -> List[str]:
    names: List[str] = []
    strings: List[object] = []  # values pushed by string opcodes and memo gets, in order
    memo: Dict[int, object] = {}
    last: object = None
    for opcode, arg, _ in pickletools.genops(stream):
        op = opcode.name
        if op in _STRING_OPS:
            last = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            strings.append(last)
            continue
        if op == "MEMOIZE":
            memo[len(memo)] = last
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
            strings.append(last)
            continue
        elif op in ("GLOBAL", "INST"):
            names.append(".".join(str(arg).split(" ", 1)))
        elif op == "STACK_GLOBAL" and len(strings) >= 2:
            module, name = strings[-2], strings[-1]
            names.append(f"{module}.{name}")
        last = None
    return names

