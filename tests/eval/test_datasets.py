"""Tests for eval.datasets: PerSeg, DAVIS (2017 and 2016 forms), plain pair folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.datasets import DatasetError, DavisDataset, PairFolderDataset, PerSegDataset
from persam.errors import InputError
from persam.data.io import load_mask

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PERSEG = DATA / "perseg_subset"
DAVIS17 = DATA / "davis2017"
DAVIS16 = DATA / "davis2016_format"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def write_image(path: Path, value: int = 100, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def write_mask(path: Path, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2:6, 3:8] = 1
    img = Image.fromarray(mask)
    img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    img.save(path)
    return path


def make_perseg(root: Path, classes=("cat", "dog"), names=("00", "01", "02")) -> Path:
    for cls in classes:
        for name in names:
            write_image(root / "Images" / cls / f"{name}.jpg")
            write_mask(root / "Annotations" / cls / f"{name}.png")
    return root


# --------------------------------------------------------------------- PerSeg


def test_perseg_shared_subset():
    ds = PerSegDataset(need(PERSEG))
    assert ds.classes() == ["cat", "colorful_sneaker", "duck_toy"]
    for cls in ds.classes():
        image, mask = ds.reference(cls)
        assert image.name == "00.jpg" and mask.name == "00.png"
        assert image.parent.name == cls and mask.parent.name == cls
        pairs = ds.test_pairs(cls)
        assert [name for name, _, _ in pairs] == ["01", "02"]
        for name, image, mask in pairs:
            assert image.stem == mask.stem == name and image.is_file() and mask.is_file()
    assert ds.problems == []
    assert load_mask(ds.reference("cat")[1]).any()


def test_perseg_root_may_be_parent_of_data_3(tmp_path):
    (tmp_path / "data 3").symlink_to(need(PERSEG), target_is_directory=True)
    ds = PerSegDataset(tmp_path)
    assert ds.classes() == ["cat", "colorful_sneaker", "duck_toy"]
    assert ds.root.name == "data 3"


def test_perseg_bad_root(tmp_path):
    with pytest.raises(DatasetError, match="no Images/ and Annotations/"):
        PerSegDataset(tmp_path)


def test_perseg_missing_mask_reported_by_name(tmp_path):
    root = make_perseg(tmp_path / "perseg")
    (root / "Annotations" / "dog" / "01.png").unlink()
    with pytest.raises(DatasetError, match=r"class dog: image .*01\.jpg has no mask"):
        PerSegDataset(root)
    ds = PerSegDataset(root, strict=False)
    assert len(ds.problems) == 1 and "dog" in ds.problems[0] and "01.jpg" in ds.problems[0]
    assert [n for n, _, _ in ds.test_pairs("dog")] == ["02"]
    assert [n for n, _, _ in ds.test_pairs("cat")] == ["01", "02"]


def test_perseg_extra_mask_and_missing_reference(tmp_path):
    root = make_perseg(tmp_path / "perseg")
    write_mask(root / "Annotations" / "cat" / "07.png")
    with pytest.raises(DatasetError, match=r"class cat: mask .*07\.png has no image"):
        PerSegDataset(root)
    (root / "Images" / "dog" / "00.jpg").unlink()
    (root / "Annotations" / "dog" / "00.png").unlink()
    ds = PerSegDataset(root, strict=False)
    assert ds.classes() == ["cat"]
    assert any("07.png" in p for p in ds.problems)
    assert any("dog" in p and "reference" in p for p in ds.problems)
    with pytest.raises(DatasetError, match="dog"):
        ds.test_pairs("dog")
    assert isinstance(DatasetError("x"), InputError)


def test_perseg_only_reference_stem_is_excluded(tmp_path):
    root = make_perseg(tmp_path / "p", classes=("cat",), names=("00", "01", "100", "a00b", "2", "10"))
    ds = PerSegDataset(root)
    assert [n for n, _, _ in ds.test_pairs("cat")] == ["01", "2", "10", "100", "a00b"]
    assert PerSegDataset(root, reference="01").reference("cat")[0].name == "01.jpg"


def test_pairing_is_by_name_not_position(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "msk"
    for name in ("a", "b", "c"):
        write_image(images / f"{name}.jpg")
    for name in ("a", "c", "d"):
        write_mask(masks / f"{name}.png")
    with pytest.raises(DatasetError, match=r"b\.jpg has no mask"):
        PairFolderDataset(images, masks)
    ds = PairFolderDataset(images, masks, strict=False)
    assert [(n, i.stem, m.stem) for n, i, m in ds] == [("a", "a", "a"), ("c", "c", "c")]
    assert len(ds) == 2
    assert any("b.jpg" in p for p in ds.problems)
    assert any("d.png" in p and "no image" in p for p in ds.problems)


def test_pair_folder_ignores_hidden_and_foreign_files(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "msk"
    write_image(images / "x1.png")
    write_mask(masks / "x1.png")
    (images / ".DS_Store").write_bytes(b"junk")
    (masks / "notes.txt").write_text("hello")
    assert [n for n, _, _ in PairFolderDataset(images, masks).pairs()] == ["x1"]
    with pytest.raises(DatasetError, match="mask folder not found"):
        PairFolderDataset(images, tmp_path / "missing")


# ---------------------------------------------------------------------- DAVIS


def test_davis2017_shared():
    ds = DavisDataset(need(DAVIS17))
    assert ds.sequences() == ["car-shadow"]
    frames = ds.frames("car-shadow")
    assert len(frames) == 40
    assert frames[0][0] == "00000" and frames[-1][0] == "00039"
    assert all(img.stem == msk.stem == name for name, img, msk in frames)
    assert ds.object_ids("car-shadow") == [1]
    labels = ds.label_map("car-shadow", "00010")
    assert labels.shape == (480, 854) and set(np.unique(labels)) == {0, 1}


def test_davis2016_form_gives_identical_label_maps():
    d17 = DavisDataset(need(DAVIS17))
    d16 = DavisDataset.from_2016(need(DAVIS16), DAVIS17 / "JPEGImages" / "480p")
    assert d16.sequences() == ["car-shadow"]
    assert d16.object_ids("car-shadow") == [1]
    f17, f16 = d17.frames("car-shadow"), d16.frames("car-shadow")
    assert [f[:2] for f in f16] == [f[:2] for f in f17]  # same names, same images
    for name, _, _ in f17:
        assert np.array_equal(d17.label_map("car-shadow", name), d16.label_map("car-shadow", name))
    masks_only = DavisDataset.from_2016(DAVIS16)
    assert masks_only.frames("car-shadow")[0][1] is None


def test_davis_split_and_partial_annotations(tmp_path):
    root = tmp_path / "DAVIS"
    seq_img = root / "JPEGImages" / "480p" / "two-objects"
    seq_ann = root / "Annotations" / "480p" / "two-objects"
    labels = np.zeros((10, 12), np.uint8)
    labels[1:4, 1:4], labels[6:9, 6:11] = 1, 2
    for t in range(4):
        write_image(seq_img / f"{t:05d}.jpg")
    seq_ann.mkdir(parents=True)
    img = Image.fromarray(labels)
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    img.save(seq_ann / "00000.png")  # test-dev style: first frame only
    with pytest.raises(DatasetError, match="split file not found"):
        DavisDataset(tmp_path)
    ds = DavisDataset(tmp_path, split=None)  # parent of DAVIS/ is accepted
    assert ds.sequences() == ["two-objects"]
    assert ds.object_ids("two-objects") == [1, 2]
    frames = ds.frames("two-objects")
    assert [m is None for _, _, m in frames] == [False, True, True, True]
    with pytest.raises(DatasetError, match="00002 has no annotation"):
        ds.label_map("two-objects", "00002")

    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("two-objects\nghost\n")
    with pytest.raises(DatasetError, match="sequence ghost"):
        DavisDataset(root)
    assert DavisDataset(root, strict=False).sequences() == ["two-objects"]


def test_davis_missing_frame_image_reported(tmp_path):
    masks, images = tmp_path / "masks" / "seq", tmp_path / "images" / "seq"
    masks.mkdir(parents=True)
    for t in range(4):
        Image.fromarray(np.full((10, 12), 255 * (t % 2), np.uint8)).save(masks / f"{t:05d}.png")
    for t in range(2):
        write_image(images / f"{t:05d}.jpg")
    with pytest.raises(DatasetError, match=r"sequence seq: mask .*00002\.png has no image"):
        DavisDataset.from_2016(tmp_path / "masks", tmp_path / "images")
    ds = DavisDataset.from_2016(tmp_path / "masks", tmp_path / "images", strict=False)
    assert [n for n, _, _ in ds.frames("seq")] == ["00000", "00001"]
    assert len(ds.problems) == 2
    assert np.array_equal(np.unique(ds.label_map("seq", "00001")), [1])
