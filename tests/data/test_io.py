"""Tests for persam.data.io: image/mask/label-map loading, errors, atomic writing."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from persam.data import io as pio
from persam.data.io import (
    InputError,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_text,
    check_reference_mask,
    davis_palette,
    load_image,
    load_label_map,
    load_mask,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PHOTO = DATA / "perseg_subset" / "Images" / "cat" / "00.jpg"
DAVIS_MASK = DATA / "davis2017" / "Annotations" / "480p" / "car-shadow" / "00000.png"


@pytest.fixture(scope="module")
def photo():
    """A small RGB crop of a shared photo (synthetic if the shared data is absent)."""
    if PHOTO.is_file():
        with Image.open(PHOTO) as img:
            return np.asarray(img.convert("RGB").resize((64, 40)))
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def blob():
    """An irregular boolean mask, 30 x 50."""
    yy, xx = np.mgrid[:30, :50]
    mask = ((yy - 14) ** 2 + (xx - 20) ** 2 < 100) | ((yy > 20) & (xx > 35))
    return mask


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# ------------------------------------------------------------------- images


def test_load_shared_photo():
    if not PHOTO.is_file():
        pytest.skip("shared data not found")
    img = load_image(PHOTO)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[:2] == (1282, 1282)


def test_grayscale_and_palette_become_rgb(tmp_path, photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    loaded = load_image(_save(Image.fromarray(gray), tmp_path / "g.png"))
    assert loaded.shape == (40, 64, 3)
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))

    pal_img = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    expected = np.asarray(pal_img.convert("RGB"))
    assert np.array_equal(load_image(_save(pal_img, tmp_path / "p.png")), expected)


def test_rgba_drops_alpha(tmp_path, photo):
    alpha = np.random.default_rng(2).integers(0, 256, photo.shape[:2], dtype=np.uint8)
    rgba = np.dstack([photo, alpha])
    loaded = load_image(_save(Image.fromarray(rgba), tmp_path / "a.png"))
    assert np.array_equal(loaded, photo)


def test_sixteen_bit_scaled_to_eight(tmp_path):
    values = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    loaded = load_image(_save(Image.fromarray(values), tmp_path / "g16.png"))
    assert loaded.dtype == np.uint8
    assert np.array_equal(loaded[..., 0], (values >> 8).astype(np.uint8))
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255

    rgb16 = np.random.default_rng(3).integers(0, 65536, (20, 30, 3)).astype(np.uint16)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb16[..., ::-1])  # cv2 writes BGR
    loaded = load_image(path)
    assert np.abs(loaded.astype(int) - (rgb16 >> 8)).max() <= 1


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_respected(tmp_path, suffix):
    arr = np.zeros((20, 40, 3), np.uint8)  # wide: red left half, blue right half
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(img, tmp_path / f"rot{suffix}", exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.shape == (40, 20, 3)
    top, bottom = loaded[:16].reshape(-1, 3).mean(0), loaded[24:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # clockwise turn: the red half is on top
    assert bottom[2] > 200 and bottom[0] < 50
    if suffix == ".png":
        assert np.array_equal(loaded, np.rot90(arr, k=-1))


def test_missing_corrupt_and_folder_errors(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="nope.jpg.*not found"):
        load_image(missing)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputError, match="garbage.jpg") as err:
        load_image(garbage)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


def test_truncated_image_error_names_file(tmp_path, photo):
    full = tmp_path / "full.jpg"
    Image.fromarray(photo).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        load_image(cut)
    with pytest.raises(InputError, match="cut.jpg"):
        load_mask(cut)


# -------------------------------------------------------------------- masks


def _mask_variants(mask, tmp_path):
    """The same mask stored in several encodings."""
    u8 = mask.astype(np.uint8)
    pal = Image.fromarray(u8)
    pal.putpalette(davis_palette().reshape(-1).tolist())
    rgb = np.zeros(mask.shape + (3,), np.uint8)
    rgb[mask] = (128, 0, 0)
    colour_rgba = np.dstack([rgb, np.full(mask.shape, 255, np.uint8)])
    alpha_rgba = np.dstack([np.full(mask.shape + (3,), 255, np.uint8), u8 * 255])
    paths = {
        "palette": _save(pal, tmp_path / "palette.png"),
        "rgb": _save(Image.fromarray(rgb), tmp_path / "rgb.png"),
        "gray255": _save(Image.fromarray(u8 * 255), tmp_path / "gray255.png"),
        "gray01": _save(Image.fromarray(u8), tmp_path / "gray01.png"),
        "rgba_alpha": _save(Image.fromarray(alpha_rgba), tmp_path / "rgba_alpha.png"),
        "rgba_colour": _save(Image.fromarray(colour_rgba), tmp_path / "rgba_colour.png"),
        "gray16": _save(Image.fromarray(u8.astype(np.uint16) * 65535), tmp_path / "gray16.png"),
        "bilevel": _save(Image.fromarray(mask), tmp_path / "bilevel.png"),
        "jpeg": _save(Image.fromarray(u8 * 255), tmp_path / "mask.jpg", quality=90),
    }
    return paths


def test_mask_encodings_give_the_same_mask(tmp_path, blob):
    for kind, path in _mask_variants(blob, tmp_path).items():
        loaded = load_mask(path)
        assert loaded.dtype == bool, kind
        if kind == "jpeg":  # lossy: allow a few edge pixels
            assert np.count_nonzero(loaded != blob) <= 10, kind
        else:
            assert np.array_equal(loaded, blob), kind


def test_shared_palette_masks_load():
    if not DAVIS_MASK.is_file():
        pytest.skip("shared data not found")
    mask = load_mask(DAVIS_MASK, shape=(480, 854, 3))
    gray = load_mask(DATA / "davis2016_format" / "car-shadow" / "00000.png")
    assert mask.any() and np.array_equal(mask, gray)


def test_mask_size_mismatch_names_file_and_sizes(tmp_path, blob):
    path = _save(Image.fromarray(blob.astype(np.uint8) * 255), tmp_path / "m.png")
    assert load_mask(path, shape=(30, 50)).shape == (30, 50)
    with pytest.raises(InputError) as err:
        load_mask(path, shape=(30, 64, 3))
    assert str(err.value) == f"mask {path} is 50x30 but its image is 64x30"


def test_check_reference_mask(blob):
    assert check_reference_mask(blob, "ref.png") is not None
    with pytest.raises(InputError, match="ref.png is empty"):
        check_reference_mask(np.zeros((4, 4), bool), "ref.png")
    with pytest.raises(InputError, match="ref.png covers the whole image"):
        check_reference_mask(np.ones((4, 4), bool), "ref.png")


# ---------------------------------------------------------------- label maps


def test_label_maps_palette_2016_and_rgb(tmp_path):
    labels = np.zeros((24, 32), np.int32)
    labels[2:10, 2:10] = 1
    labels[12:20, 5:25] = 2
    labels[0, 31] = 3
    pal_path = atomic_save_png(tmp_path / "ids.png", labels, palette=davis_palette())
    with Image.open(pal_path) as img:
        assert img.mode == "P"
        assert img.getpalette()[3:6] == [128, 0, 0]
    assert np.array_equal(load_label_map(pal_path), labels)

    rgb = davis_palette()[labels]
    rgb_path = _save(Image.fromarray(rgb), tmp_path / "ids_rgb.png")
    assert np.array_equal(load_label_map(rgb_path), labels)

    binary = labels > 0
    gray = _save(Image.fromarray(binary.astype(np.uint8) * 255), tmp_path / "2016.png")
    assert np.array_equal(load_label_map(gray), binary.astype(np.int32))

    odd = rgb.copy()
    odd[0, 0] = (1, 2, 3)
    with pytest.raises(InputError, match=r"ids_odd.png.*\(1, 2, 3\)"):
        load_label_map(_save(Image.fromarray(odd), tmp_path / "ids_odd.png"))


def test_davis_palette():
    pal = davis_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0]
    assert pal[4].tolist() == [0, 0, 128]
    assert pal[255].tolist() == [224, 224, 192]
    if DAVIS_MASK.is_file():
        with Image.open(DAVIS_MASK) as img:
            official = np.array(img.getpalette()).reshape(-1, 3)
        assert np.array_equal(official, pal[: len(official)])


# ---------------------------------------------------------------- writing


def test_atomic_writes_roundtrip_and_leave_no_temp(tmp_path, blob):
    out = tmp_path / "sub" / "dir"
    atomic_write_text(out / "a.txt", "first")
    atomic_write_text(out / "a.txt", "héllo\n")
    assert (out / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(out / "b.bin", b"\x00\x01")
    assert (out / "b.bin").read_bytes() == b"\x00\x01"
    atomic_save_png(out / "m.png", blob)
    assert np.array_equal(load_mask(out / "m.png"), blob)
    rgb = np.random.default_rng(4).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    atomic_save_png(out / "rgb.png", rgb)
    assert np.array_equal(load_image(out / "rgb.png"), rgb)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.bin", "m.png", "rgb.png"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pio.os, "replace", broken_replace)
    with pytest.raises(InputError, match="keep.txt"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unwritable_output_folder_is_named(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(InputError, match="blocker"):
        atomic_write_text(blocker / "out.txt", "x")
    with pytest.raises(InputError, match="blocker"):
        atomic_save_png(blocker / "deeper" / "m.png", np.zeros((4, 4), bool))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="ro"):
            atomic_write_text(folder / "out.txt", "x")
    finally:
        folder.chmod(0o700)


def test_bad_arrays_are_rejected(tmp_path):
    with pytest.raises(InputError, match="ids must be within"):
        atomic_save_png(tmp_path / "x.png", np.full((3, 3), 300), palette="davis")
    with pytest.raises(InputError, match="unsupported array"):
        atomic_save_png(tmp_path / "x.png", np.zeros((3, 3), np.float32))
