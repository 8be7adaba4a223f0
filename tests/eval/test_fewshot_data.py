"""FSS-1000 / COCO-20i episodes, class splits and scores against the official GF-SAM loaders and evaluation."""

import pickle
import types

import numpy as np
import pytest
import torch

from eval.datasets import DatasetError
from eval.fewshot_data import (COCO20i, FSS1000, FSS_TEST_SPLIT, coco_split_from_pickle, read_class_list,
                               read_coco_split)
from eval.fewshot_metrics import FewShotMeter, episode_areas
from eval.run_fewshot import resize_mask
from fewshot_testing import (mirror_file, official_logger, official_module, write_coco, write_fss,
                             write_split)

FSS_CLASSES = ["zebra", "apple", "kite"]


@pytest.fixture
def fss(tmp_path):
    root = write_fss(tmp_path / "FSS-1000", FSS_CLASSES)
    write_split(root / "splits" / "test.txt", FSS_CLASSES, newline="\r\n")  # the official file has CRLF lines
    return root


# --------------------------------------------------------------------------- FSS-1000


@pytest.mark.parametrize("shots", [1, 5])
def test_fss_episodes_equal_the_official_loaders(fss, tmp_path, shots):
    official = official_module(tmp_path, "matcher/data/fss.py", "gfsam_official_fss")
    size = 40

    def transform(img):  # torchvision's Resize((S, S)) + ToTensor on a PIL image
        from PIL import Image
        return torch.from_numpy(np.array(img.resize((size, size), Image.Resampling.BILINEAR))).permute(2, 0, 1)

    theirs = official.DatasetFSS(str(tmp_path), 0, transform, "test", shots, False)
    dataset = FSS1000(fss, fss / "splits" / "test.txt")
    ours = dataset.episodes(shots, seed=0)
    np.random.seed(0)  # as the official test() does (utils.fix_randseed(0)) before the first episode
    batches = [theirs[i] for i in range(len(theirs))]
    assert len(ours) == len(batches) == 30
    assert [str(e.query) for e in ours] == [b["query_name"] for b in batches]
    assert [[str(s) for s in e.supports] for e in ours] == [b["support_names"] for b in batches]
    assert [e.class_index + 760 for e in ours] == [int(b["class_id"]) for b in batches]
    assert ours[0].query.name == "1.jpg" and ours[1].query.name == "10.jpg"  # string order, as glob + sorted
    assert all(e.query not in e.supports and len(e.supports) == shots for e in ours)
    for e, b in zip(ours[:4], batches[:4]):  # the masks as the official loader resizes them
        assert np.array_equal(resize_mask(dataset.mask(e.query, e), size), b["query_mask"].numpy() > 0)
        assert np.array_equal(resize_mask(dataset.mask(e.supports[0], e), size), b["support_masks"][0].numpy() > 0)


def test_fss_seed_changes_supports_not_queries(fss):
    dataset = FSS1000(fss, fss / "splits" / "test.txt")
    a, b = dataset.episodes(1, seed=0), dataset.episodes(1, seed=1)
    assert [e.query for e in a] == [e.query for e in b]
    assert [e.supports for e in a] != [e.supports for e in b]
    assert [e.supports for e in a] == [e.supports for e in dataset.episodes(1, seed=0)]


def test_fss_missing_split_classes_are_named_in_one_line(fss, tmp_path):
    split = write_split(tmp_path / "mine.txt", FSS_CLASSES + [f"absent_{i}" for i in range(7)])
    with pytest.raises(DatasetError) as info:
        FSS1000(fss, split)
    message = str(info.value)
    assert "\n" not in message and "7 of the 10 classes" in message and str(split) in message
    assert "absent_0, absent_1, absent_2, absent_3, absent_4 (and 2 more)" in message


def test_fss_missing_support_file_is_named(fss):
    (fss / "data" / "kite" / "7.png").unlink()
    with pytest.raises(DatasetError, match=r"kite/7\.png"):
        FSS1000(fss, fss / "splits" / "test.txt").episodes(1)


def test_fss_data_folder_itself_is_accepted(fss):
    assert FSS1000(fss / "data", fss / "splits" / "test.txt").root == fss / "data"


def test_shipped_fss_split_is_the_official_test_split():
    official = mirror_file("datasets/FSS-1000/splits/test.txt").decode()
    names = read_class_list(FSS_TEST_SPLIT)
    assert len(names) == 240 == len(set(names))
    assert names == [line for line in official.splitlines() if line]


# --------------------------------------------------------------------------- COCO-20i


@pytest.mark.parametrize("shots", [1, 5])
def test_coco_episodes_equal_the_official_loaders(tmp_path, shots):
    official = official_module(tmp_path, "matcher/data/coco.py", "gfsam_official_coco")
    root = tmp_path / "COCO2014"
    write_coco(root, fold=0)
    theirs = official.DatasetCOCO(str(tmp_path), 0, None, "test", shots, False)
    dataset = COCO20i(root, 0, root / "splits" / "val" / "fold0.pkl")
    ours = dataset.episodes(shots, seed=0)
    np.random.seed(0)
    frames = [theirs.load_frame() for _ in range(len(theirs))]
    assert len(ours) == len(frames) == 1000
    assert [str(e.query.relative_to(root)) for e in ours] == [f[4] for f in frames]
    assert [[str(s.relative_to(root)) for s in e.supports] for e in ours] == [f[5] for f in frames]
    assert [e.class_index for e in ours] == [int(f[6]) for f in frames]
    assert len({e.class_index for e in ours}) == 20
    for e, f in zip(ours[:5], frames[:5]):
        assert np.array_equal(dataset.mask(e.query, e), f[1].numpy() == 1)
        assert np.array_equal(dataset.mask(e.supports[0], e), f[3][0].numpy() == 1)


def test_coco_pickle_is_read_as_plain_data_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "fold0.pkl"
    path.write_bytes(pickle.dumps({0: [Payload()]}))
    with pytest.raises(Exception, match="refusing to load builtins.print"):
        coco_split_from_pickle(path)


@pytest.mark.parametrize("fold", range(4))
def test_shipped_coco_splits_equal_the_official_pickles(tmp_path, fold):
    path = tmp_path / f"fold{fold}.pkl"
    path.write_bytes(mirror_file(f"datasets/COCO2014/splits/val/fold{fold}.pkl"))
    official = coco_split_from_pickle(path)
    shipped = read_coco_split(fold)
    assert sorted(shipped) == [fold + 4 * v for v in range(20)]
    assert all(shipped[c] == official[c] for c in shipped)


def test_coco_missing_images_are_named(tmp_path):
    root = tmp_path / "COCO2014"
    write_coco(root)
    for png in sorted((root / "annotations" / "val2014").glob("*.png"))[:2]:
        png.unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\) the episodes need are missing"):
        COCO20i(root, 0, root / "splits" / "val" / "fold0.pkl").episodes(1)


# --------------------------------------------------------------------------- scores


def _masks():
    """Hand-made 4 x 4 episodes: (class, prediction, ground truth)."""
    gt_a = np.zeros((4, 4), bool)
    gt_a[:2, :2] = True  # 4 px
    pred_a1 = np.zeros((4, 4), bool)
    pred_a1[:2, :3] = True  # 6 px: fg inter 4, union 6; bg inter 10, union 12
    pred_a2 = np.zeros((4, 4), bool)  # empty: fg inter 0, union 4; bg inter 12, union 16
    gt_b = np.zeros((4, 4), bool)
    gt_b[3, :] = True
    pred_b = gt_b.copy()  # exact: fg 4 / 4, bg 12 / 12
    return [(0, pred_a1, gt_a), (0, pred_a2, gt_a), (1, pred_b, gt_b)]


def test_scores_on_hand_made_predictions():
    inter, union = episode_areas(*_masks()[0][1:])
    assert inter.tolist() == [10, 4] and union.tolist() == [12, 6]
    meter = FewShotMeter([0, 1, 2])
    for c, pred, gt in _masks():
        meter.add(c, *episode_areas(pred, gt))
    scores = meter.scores()
    assert scores["classes"][0] == {"iou": pytest.approx(4 / 10), "episodes": 2}  # (4 + 0) / (6 + 4)
    assert scores["classes"][1]["iou"] == 1.0
    assert scores["classes"][2] == {"iou": 0.0, "episodes": 0}  # never drawn: 0, as the official meter
    assert scores["miou"] == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert scores["fb_iou"] == pytest.approx(((10 + 12 + 12) / (12 + 16 + 12) + (4 + 0 + 4) / (6 + 4 + 4)) / 2)


def test_scores_equal_the_official_evaluation(tmp_path, monkeypatch):
    evaluation = official_module(tmp_path, "matcher/common/evaluation.py", "gfsam_official_evaluation")
    logger = official_logger(tmp_path, monkeypatch)
    evaluation.Evaluator.initialize()
    meter_official = logger.AverageMeter(types.SimpleNamespace(benchmark="fss", class_ids=[760, 761, 762]))
    ours = FewShotMeter([0, 1, 2])
    rng = np.random.default_rng(3)
    episodes = _masks() + [(int(rng.integers(0, 3)), rng.random((9, 7)) > 0.5, rng.random((9, 7)) > 0.6)
                           for _ in range(12)]
    for c, pred, gt in episodes:
        batch = {"query_mask": torch.from_numpy(gt[None].astype(np.float32))}
        inter, union = evaluation.Evaluator.classify_prediction(torch.from_numpy(pred[None].astype(np.float32)), batch)
        meter_official.update(inter, union, torch.tensor([760 + c]), None)
        ours.add(c, *episode_areas(pred, gt))
    miou, fb_iou, _ = meter_official.compute_iou()
    assert ours.miou() * 100 == pytest.approx(float(miou), abs=1e-4)
    assert ours.fb_iou() * 100 == pytest.approx(float(fb_iou), abs=1e-4)


def test_class_lists_are_package_data():
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    from conftest import REPO
    from eval.fewshot_data import SPLITS_DIR

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["eval"]
    shipped = sorted(f"splits/{p.name}" for p in SPLITS_DIR.iterdir())
    assert len(shipped) == 5  # the FSS-1000 test split and COCO-20i's four folds
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in shipped)
