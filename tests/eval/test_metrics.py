"""Metric tests: hand-made cases with known answers, and GT-vs-GT on the shared data."""

import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.metrics import (
    boundary_intersection_union,
    boundary_iou,
    boundary_region,
    boundary_width,
    class_scores,
    davis_sequence_scores,
    davis_summary,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    f_measure,
    intersection_union,
    iou,
    miou,
    seg2bmap,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def square(shape, top, left, size):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# --------------------------------------------------------------------------- IoU


def test_iou_perfect_disjoint_and_empty():
    a = square((50, 60), 10, 10, 20)
    assert iou(a, a) == 1.0
    assert iou(a, square((50, 60), 10, 35, 20)) == 0.0
    empty = np.zeros((50, 60), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, a) == 0.0
    assert intersection_union(a, a) == (400, 400)


@pytest.mark.parametrize("s,k", [(20, 1), (20, 3), (31, 7)])
def test_iou_shifted_square_by_hand(s, k):
    gt = square((100, 100), 30, 30, s)
    pred = square((100, 100), 30, 30 + k, s)
    expected = (s - k) * s / (s * s + k * s)
    assert iou(pred, gt) == pytest.approx(expected)
    assert intersection_union(pred, gt) == ((s - k) * s, s * s + k * s)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ------------------------------------------------------------------ Boundary IoU


def official_style_boundary(mask, dilation_ratio=0.02):
    """Independent oracle: 1-px zero pad, 3x3 erosion iterated d times, mask minus erosion."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask.astype(bool) & ~eroded.astype(bool)


def test_boundary_width():
    assert boundary_width((300, 400)) == 10  # 0.02 * 500
    assert boundary_width((10, 10)) == 1  # never below one pixel


def test_boundary_region_of_square_by_hand():
    shape = (300, 400)  # d = 10
    sq = square(shape, 100, 100, 60)
    assert boundary_region(sq).sum() == 60 * 60 - 40 * 40
    # A square touching the image border has its border side in the band too.
    corner = square(shape, 0, 0, 60)
    assert boundary_region(corner).sum() == 60 * 60 - 40 * 40


def test_boundary_region_matches_official_iterated_erosion():
    rng = np.random.default_rng(0)
    for shape in [(120, 90), (64, 200)]:
        blobs = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 6) > 0.5
        blobs[:, :5] = True  # touch the border
        assert np.array_equal(boundary_region(blobs), official_style_boundary(blobs))


def test_boundary_iou_basic_cases():
    a = square((200, 200), 50, 50, 80)
    assert boundary_iou(a, a) == 1.0
    assert boundary_iou(a, square((200, 200), 50, 140, 50)) == 0.0
    empty = np.zeros((200, 200), bool)
    assert boundary_iou(empty, empty) == 1.0
    inter, union = boundary_intersection_union(a, a)
    assert inter == union == boundary_region(a).sum()


def test_thin_ring_error_costs_boundary_iou_much_more_than_iou():
    # The prediction misses a 2-pixel ring along the object's edge: a 100 px
    # square predicted as the 96 px square inside it. With the band d = 10 of a
    # 300 x 400 image, each band is the frame between two nested squares:
    # truth 100 to 80, prediction 96 to 76. They meet in the frame 96 to 80 and
    # together cover the frame 100 to 76, so
    #   IoU  = 96^2 / 100^2                     = 0.92
    #   bIoU = (96^2 - 80^2) / (100^2 - 76^2)   = 0.67
    shape = (300, 400)
    assert boundary_width(shape) == 10
    gt = square(shape, 100, 100, 100)
    pred = square(shape, 102, 102, 96)
    assert iou(pred, gt) == pytest.approx(96**2 / 100**2)
    assert boundary_intersection_union(pred, gt) == (96**2 - 80**2, 100**2 - 76**2)
    assert boundary_iou(pred, gt) == pytest.approx((96**2 - 80**2) / (100**2 - 76**2))
    assert boundary_iou(pred, gt) < iou(pred, gt) - 0.2
    # The same ring added outside the object: frames 104 to 84 and 100 to 80.
    grown = square(shape, 98, 98, 104)
    assert iou(grown, gt) == pytest.approx(100**2 / 104**2)
    assert boundary_iou(grown, gt) == pytest.approx((100**2 - 84**2) / (104**2 - 80**2))
    assert boundary_iou(grown, gt) < iou(grown, gt) - 0.2


def test_boundary_iou_much_lower_than_iou_for_small_shift():
    gt = disc((300, 300), 150, 150, 100)
    for shift in (1, 2):
        pred = np.roll(gt, shift, axis=1)
        region, band = iou(pred, gt), boundary_iou(pred, gt)
        assert region > 0.97
        assert band < region - 0.1


# -------------------------------------------------------------------- PerSeg agg


def test_class_scores_sum_over_images_and_miou():
    shape = (100, 100)
    gt1, gt2 = square(shape, 10, 10, 20), square(shape, 10, 10, 40)
    pred1, pred2 = np.zeros(shape, bool), gt2.copy()
    scores = class_scores([(pred1, gt1), (pred2, gt2)])
    assert scores["iou"] == pytest.approx(1600 / (400 + 1600))  # sum I / sum U
    assert scores["mean_image_iou"] == pytest.approx(0.5)
    assert scores["n_images"] == 2
    b1 = boundary_intersection_union(pred1, gt1)
    b2 = boundary_intersection_union(pred2, gt2)
    assert scores["biou"] == pytest.approx((b1[0] + b2[0]) / (b1[1] + b2[1]))
    per_class = {"a": scores, "b": {"iou": 1.0, "biou": 1.0}}
    assert miou(per_class) == pytest.approx((scores["iou"] + 1.0) / 2)
    assert miou(per_class, "biou") == pytest.approx((scores["biou"] + 1.0) / 2)
    assert miou([0.2, 0.4]) == pytest.approx(0.3)


# ---------------------------------------------------------------------- DAVIS J/F


def test_db_eval_iou_edge_cases_and_batch():
    a = square((30, 30), 5, 5, 10)
    empty = np.zeros((30, 30), bool)
    assert db_eval_iou(a, a) == 1.0
    assert db_eval_iou(empty, empty) == 1.0
    assert db_eval_iou(a, empty) == 0.0
    batch = db_eval_iou(np.stack([a, empty, a]), np.stack([a, empty, empty]))
    assert batch.tolist() == [1.0, 1.0, 0.0]


def test_seg2bmap_by_hand():
    seg = np.zeros((4, 4), bool)
    seg[1, 1] = True
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:2] = True  # the pixel and its N, W, NW neighbours (half-pixel shift)
    assert np.array_equal(seg2bmap(seg), expected)
    full = np.ones((5, 6), bool)
    assert not seg2bmap(full).any()  # the image border is no boundary


def test_f_measure_within_and_beyond_tolerance():
    shape = (480, 854)  # bound_pix = ceil(0.008 * 979.7) = 8
    gt = square(shape, 100, 200, 200)
    assert db_eval_boundary(gt, gt) == 1.0
    assert db_eval_boundary(gt, np.roll(gt, 3, axis=1)) == 1.0
    assert db_eval_boundary(gt, np.roll(gt, (5, 5), axis=(0, 1))) == 1.0
    far = np.roll(gt, (20, 20), axis=(0, 1))
    assert db_eval_boundary(gt, far) < 0.1
    assert db_eval_boundary(gt, square(shape, 350, 600, 50)) == 0.0


def test_f_measure_edge_cases_and_pixel_threshold():
    gt = square((100, 100), 20, 20, 40)
    empty = np.zeros((100, 100), bool)
    assert db_eval_boundary(empty, empty) == 1.0
    assert db_eval_boundary(gt, empty) == 0.0
    assert db_eval_boundary(empty, gt) == 0.0
    # bound_th >= 1 is a tolerance in pixels.
    shifted = np.roll(gt, 4, axis=1)
    assert db_eval_boundary(gt, shifted, bound_th=5) == 1.0
    assert db_eval_boundary(gt, shifted, bound_th=2) < 1.0
    assert f_measure(shifted, gt, bound_th=5) == 1.0


def test_db_statistics_planted_decay():
    values = np.array([1.0] * 10 + [0.5] * 20 + [0.0] * 10)  # 40 frames
    mean, recall, decay = db_statistics(values)
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(10 / 40)
    # Official bins: edges round(linspace(1, 40, 5)) - 1 = [0, 10, 20, 29, 39], right edge included.
    assert decay == pytest.approx((10 * 1.0 + 0.5) / 11 - (0.5 + 10 * 0.0) / 11)
    assert db_statistics(np.ones(12)) == (1.0, 1.0, 0.0)


def test_db_statistics_nan_safe():
    values = np.array([1.0, np.nan, 1.0, 0.0, np.nan, 0.0, 0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, recall, decay = db_statistics(values)
        assert mean == pytest.approx(2 / 6)
        assert recall == pytest.approx(2 / 6)
        assert np.isfinite(decay)
        assert all(math.isnan(v) for v in db_statistics([np.nan, np.nan]))
        assert all(math.isnan(v) for v in db_statistics([]))


def test_davis_sequence_scores_multi_object_and_excluded_frames():
    shape = (60, 80)
    gt = np.zeros(shape, np.int32)
    gt[5:25, 5:25] = 1
    gt[30:55, 40:75] = 2
    n = 8
    gt_frames = [gt.copy() for _ in range(n)]
    pred_frames = [gt.copy() for _ in range(n)]
    pred_frames[0][:] = 0  # first and last frames are not scored
    pred_frames[-1][:] = 2
    for t in (3, 4):  # object 2 lost on two inner frames
        pred_frames[t][pred_frames[t] == 2] = 0
    scores = davis_sequence_scores(gt_frames, pred_frames, [1, 2])
    obj1, obj2 = scores["objects"][1], scores["objects"][2]
    assert len(obj1["J"]) == n - 2
    assert obj1["J_stats"]["mean"] == 1.0 and obj1["F_stats"]["mean"] == 1.0
    assert obj2["J"].tolist() == [1, 1, 0, 0, 1, 1]
    assert obj2["J_stats"]["mean"] == pytest.approx(4 / 6)
    assert obj2["F_stats"]["recall"] == pytest.approx(4 / 6)
    j_mean = (1.0 + 4 / 6) / 2
    assert scores["J"]["mean"] == pytest.approx(j_mean)
    assert scores["J&F"] == pytest.approx((scores["J"]["mean"] + scores["F"]["mean"]) / 2)
    summary = davis_summary([scores])
    assert summary["J&F"] == pytest.approx(scores["J&F"])


# ---------------------------------------------------------- shared data, GT vs GT


def test_perseg_gt_against_itself_scores_one():
    from eval.datasets import PerSegDataset
    from persam.data.io import load_mask

    root = DATA / "perseg_subset"
    if not root.is_dir():
        pytest.skip(f"shared data not found: {root}")
    ds = PerSegDataset(root)
    per_class = {}
    for name in ds.classes():
        masks = [load_mask(m) for _, _, m in ds.test_pairs(name)]
        per_class[name] = class_scores((m, m) for m in masks)
        assert per_class[name]["n_images"] == 2
    assert len(per_class) == 3
    assert miou(per_class) == 1.0
    assert miou(per_class, "biou") == 1.0


def test_davis_gt_against_itself_scores_one():
    from eval.datasets import DavisDataset

    root = DATA / "davis2017"
    if not root.is_dir():
        pytest.skip(f"shared data not found: {root}")
    ds = DavisDataset(root)
    seq = ds.sequences()[0]
    frames = [ds.label_map(seq, name) for name, _, _ in ds.frames(seq)]
    scores = davis_sequence_scores(frames, frames, ds.object_ids(seq))
    assert scores["J"] == {"mean": 1.0, "recall": 1.0, "decay": 0.0}
    assert scores["F"] == {"mean": 1.0, "recall": 1.0, "decay": 0.0}
    assert scores["J&F"] == 1.0
    # A one-frame lag on the real masks scores below 1 but stays high.
    lagged = [frames[0]] + frames[:-1]
    lag = davis_sequence_scores(frames, lagged, ds.object_ids(seq))
    assert 0.5 < lag["J"]["mean"] < 1.0
    assert 0.0 < lag["F"]["mean"] < 1.0
