"""Reading and writing images, masks and label maps, safe on bad input.

Every problem with a file raises :class:`persam.errors.InputError` (a ``ValueError``) whose
message is one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from persam.errors import InputError

PathLike = Union[str, os.PathLike]

__all__ = [
    "load_image",
    "load_mask",
    "load_label_map",
    "check_reference_mask",
    "davis_palette",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_png",
    "encode_png",
]


# --------------------------------------------------------------------------- #
# Decoding helpers
# --------------------------------------------------------------------------- #

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open(path: PathLike, kind: str, data: Optional[bytes] = None) -> Tuple[Image.Image, str]:
    """Open and fully decode ``path`` with Pillow, EXIF orientation applied.

    With ``data`` (the file's bytes, already read: a remote image) those are decoded and
    ``path`` only names the file in messages.
    Returns the decoded image and its container format (``"PNG"``, ``"JPEG"``...).
    """
    p = Path(path) if data is None else path
    if data is None and not p.exists():
        raise InputError(f"{kind} {p}: file not found")
    if data is None and p.is_dir():
        raise InputError(f"{kind} {p}: is a folder, not an image file")
    try:
        with Image.open(p if data is None else io.BytesIO(data)) as img:
            img.load()
            fmt = img.format or ""
            try:
                out = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block must not make the pixels unusable
                out = img.copy()
            if out is img:
                out = img.copy()
    except Image.UnidentifiedImageError:
        raise InputError(f"{kind} {p}: not a readable image (unknown or corrupt format)") from None
    except PermissionError:
        raise InputError(f"{kind} {p}: permission denied") from None
    except _DECODE_ERRORS as exc:
        raise InputError(f"{kind} {p}: cannot decode image ({_one_line(exc)})") from None
    if out.width == 0 or out.height == 0:
        raise InputError(f"{kind} {p}: image has zero size")
    return out, fmt


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text[:200]


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit values to 8 bits by keeping the high byte (as Pillow does for 16-bit RGB)."""
    return (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _is_uniform(arr: np.ndarray) -> bool:
    """True when every pixel of an H x W [x C] array has the same value."""
    flat = arr.reshape(arr.shape[0] * arr.shape[1], -1)
    return bool((flat == flat[0]).all())


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def load_image(path: PathLike, data: Optional[bytes] = None) -> np.ndarray:
    """Load an image as an H x W x 3 uint8 RGB array.

    Grayscale, palette, CMYK, RGBA (alpha dropped) and 16-bit inputs are converted;
    the EXIF orientation is applied.  With ``data`` the image is decoded from those bytes
    (the file read elsewhere, e.g. from an object store) and ``path`` names it in messages.
    """
    img, _ = _open(path, "image", data)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = _sixteen_to_eight(np.asarray(img))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        raise InputError(f"image {Path(path)}: floating-point images are not supported")
    if mode != "RGB":
        try:
            img = img.convert("RGB")
        except _DECODE_ERRORS as exc:
            raise InputError(f"image {Path(path)}: cannot convert mode {mode} to RGB ({_one_line(exc)})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- #
# Masks and label maps
# --------------------------------------------------------------------------- #


def _shape_hw(shape: Sequence[int]) -> Tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"shape must be (H, W) or (H, W, C), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def load_mask(
    path: PathLike, shape: Optional[Sequence[int]] = None, image_path: Optional[PathLike] = None
) -> np.ndarray:
    """Load a binary mask as an H x W bool array.

    Foreground is: palette index > 0; any non-black pixel for RGB; value > 0 for
    grayscale (0/255 or 0/1) and 16-bit; for RGBA / LA the alpha channel when the
    colour is uniform, else the non-black colour where alpha > 0. Lossy JPEG masks
    are thresholded at half range instead of > 0.
    ``shape`` (the image's H x W[ x C]) is checked against the mask size; with
    ``image_path`` (the image file of ``shape``) the message names the image and says when
    the mask fits the image only before its EXIF orientation is applied.
    """
    p = Path(path)
    img, fmt = _open(p, "mask")
    lossy = fmt.upper() in ("JPEG", "MPO", "WEBP")
    mode = img.mode
    if mode in ("P", "PA"):
        mask = np.asarray(img.convert("P") if mode == "PA" else img) > 0
    elif mode == "1":
        mask = np.asarray(img).astype(bool)
    elif mode in ("RGBA", "LA", "RGBa", "La"):
        img = img.convert("RGBA" if mode in ("RGBA", "RGBa") else "LA")
        arr = np.asarray(img)
        colour, alpha = arr[..., :-1], arr[..., -1]
        if _is_uniform(colour):
            mask = alpha >= 128 if lossy else alpha > 0
        else:
            mask = _nonblack(colour, lossy) & (alpha > 0)
    else:
        if mode not in ("L", "RGB", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            img = img.convert("RGB")
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        mask = _nonblack(arr, lossy)
    _check_size(mask, shape, f"mask {p}", image_path)
    return np.ascontiguousarray(mask)


def _nonblack(arr: np.ndarray, lossy: bool) -> np.ndarray:
    """Pixels of an H x W x C array with any channel above zero (half range if lossy)."""
    if lossy:
        half = 128 if arr.dtype == np.uint8 else 32768
        return (arr >= half).any(axis=2)
    return (arr > 0).any(axis=2)


def load_label_map(path: PathLike, shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Load a label map of object ids as an H x W int32 array.

    Palette PNGs give their indices (DAVIS 2017). Grayscale maps holding only 0 and
    255 (DAVIS 2016) become 0/1; other grayscale values are ids as stored. RGB maps
    are read through the DAVIS palette (black/white-only RGB becomes 0/1).
    """
    p = Path(path)
    img, _ = _open(p, "label map")
    mode = img.mode
    if mode in ("P", "PA"):
        labels = np.asarray(img.convert("P") if mode == "PA" else img).astype(np.int32)
    elif mode in ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        if mode == "LA":
            img = img.convert("L")
        labels = np.asarray(img).astype(np.int32)
        if mode != "1" and _only_values(labels, (0, 255)):
            labels = (labels == 255).astype(np.int32)
    elif mode == "F":
        values = np.asarray(img)
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise InputError(f"label map {p}: floating-point values are not integer object ids")
        labels = values.astype(np.int32)
    else:
        labels = _rgb_to_ids(np.asarray(img.convert("RGB")), p)
    _check_size(labels, shape, f"label map {p}")
    return np.ascontiguousarray(labels)


# EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse)
_SWAPPING_ORIENTATIONS = {5: "transpose", 6: "rotate 90", 7: "transverse", 8: "rotate 270"}


def exif_orientation(path: PathLike) -> int:
    """The EXIF orientation tag (1..8) of an image file; 1 (none) when absent or unreadable."""
    try:
        with Image.open(path) as img:
            value = img.getexif().get(0x0112, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:
        return 1


def _check_size(array: np.ndarray, shape, what: str, image_path: Optional[PathLike] = None) -> None:
    """InputError when a mask-like H x W array is not the size of its image (`shape`, when given)."""
    if shape is None:
        return
    h, w = _shape_hw(shape)
    if array.shape == (h, w):
        return
    size = f"{what} is {array.shape[1]}x{array.shape[0]}"
    if image_path is None:
        raise InputError(f"{size} but its image is {w}x{h}")
    image = Path(image_path)
    orientation = exif_orientation(image)
    if array.shape == (w, h) and orientation in _SWAPPING_ORIENTATIONS:
        raise InputError(
            f"{size} but its image {image} is {w}x{h}: the image has an EXIF orientation "
            f"({orientation}, {_SWAPPING_ORIENTATIONS[orientation]}) that is applied when it is loaded, and the "
            f"mask matches the un-rotated pixels; draw the mask on the rotated image (or save the image "
            f"without the EXIF orientation)"
        )
    raise InputError(f"{size} but its image {image} is {w}x{h}")


def _only_values(arr: np.ndarray, values: Sequence[int]) -> bool:
    return bool(np.isin(np.unique(arr), values).all())


def _rgb_to_ids(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map an RGB label image to ids through the DAVIS palette."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    present = np.unique(codes)
    if np.isin(present, (0, 0xFFFFFF)).all():
        return (codes == 0xFFFFFF).astype(np.int32)
    pal = davis_palette().astype(np.int32)
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    known = np.isin(present, pal_codes)
    if not known.all():
        bad = int(present[~known][0])
        colour = ((bad >> 16) & 255, (bad >> 8) & 255, bad & 255)
        raise InputError(f"label map {path}: colour {colour} is not a DAVIS palette colour")
    lut_codes, lut_ids = np.unique(pal_codes, return_index=True)
    return lut_ids[np.searchsorted(lut_codes, codes)].astype(np.int32)


def check_reference_mask(mask: np.ndarray, path: PathLike) -> np.ndarray:
    """Reject a reference mask that is empty or covers the whole image; return it."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError(f"reference mask {Path(path)} is empty (no foreground pixels)")
    if mask.all():
        raise InputError(f"reference mask {Path(path)} covers the whole image (no background pixels)")
    return mask


# --------------------------------------------------------------------------- #
# Palette
# --------------------------------------------------------------------------- #


def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map: 256 x 3 uint8, index 1 = (128, 0, 0)."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            pal[:, channel] |= ((idx >> (3 * bit + channel)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


# --------------------------------------------------------------------------- #
# Atomic writing
# --------------------------------------------------------------------------- #


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename).

    The file gets the permissions of any new file (0666 less the umask: 0644 under umask 022;
    see :func:`_new_temp_file`). Missing parent folders are created. Returns the path written.
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {folder} ({_reason(exc)})") from None
    tmp_name = None
    try:
        fd, tmp_name = _new_temp_file(folder, p.name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, p)
        tmp_name = None
    except OSError as exc:
        raise InputError(f"cannot write {p}: output folder {folder} is not writable ({_reason(exc)})") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return p


def _new_temp_file(folder: Path, name: str) -> Tuple[int, str]:
    """Create ``folder/.NAME.RANDOM.tmp`` for writing; its file descriptor and path.

    Opened with mode 0666 so that the kernel applies the umask (and a default ACL) exactly as
    for any file a program creates: no need to read the process-wide umask, which can only be
    read by changing it (racy with other threads). ``tempfile.mkstemp`` would make it 0600.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp_name = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp_name, flags, 0o666), tmp_name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name in {folder}")


def _reason(exc: OSError) -> str:
    return exc.strerror or _one_line(exc)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_png(
    path: PathLike,
    array: np.ndarray,
    palette: Union[None, str, np.ndarray] = None,
) -> Path:
    """Save an array as a PNG atomically.

    With ``palette`` (a K x 3 array, K <= 256, or ``"davis"``) ``array`` is an H x W
    map of indices 0..255 saved as a palette PNG (label maps). Without it: bool
    H x W -> grayscale 0/255, uint8 H x W -> grayscale, uint16 H x W -> 16-bit
    grayscale, uint8 H x W x 3 / x 4 -> RGB / RGBA.
    """
    p = Path(path)
    return atomic_write_bytes(p, encode_png(array, palette, p))


def encode_png(array: np.ndarray, palette: Union[None, str, np.ndarray] = None, path: PathLike = "PNG") -> bytes:
    """The PNG bytes :func:`atomic_save_png` writes (``path`` names the file in messages)."""
    arr = np.asarray(array)
    img = _palette_image(arr, palette, path) if palette is not None else _plain_image(arr, path)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _palette_image(arr: np.ndarray, palette: Union[str, np.ndarray], path: Path) -> Image.Image:
    if arr.ndim != 2:
        raise InputError(f"cannot save {path}: a palette PNG needs an H x W index map, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"cannot save {path}: a palette PNG needs integer ids, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(f"cannot save {path}: ids must be within 0..255, got {arr.min()}..{arr.max()}")
    pal = davis_palette() if isinstance(palette, str) and palette.lower() == "davis" else palette
    if isinstance(pal, str):
        raise InputError(f"cannot save {path}: unknown palette {palette!r}")
    pal = np.asarray(pal)
    if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 256:
        raise InputError(f"cannot save {path}: palette must be K x 3 with K <= 256, got {pal.shape}")
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: pal.shape[0]] = np.clip(pal, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))
    img.putpalette(full.reshape(-1).tolist())  # turns the L image into P
    return img


def _plain_image(arr: np.ndarray, path: Path) -> Image.Image:
    if arr.ndim == 2 and arr.dtype == bool:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if arr.ndim == 2 and arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim == 2 and arr.dtype == np.uint16:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise InputError(
        f"cannot save {path}: unsupported array shape {arr.shape} / dtype {arr.dtype} "
        "(use bool/uint8/uint16 H x W, uint8 H x W x 3|4, or pass a palette for label maps)"
    )
