"""PerSAM steps 1-4, the pipeline, concept files and multi-object search, each against an explicit computation.

A seeded random SAM ViT-B at input side 256 (a 16 x 16 feature grid) keeps
this fast; shared PerSeg photos are downscaled by slicing [::8, ::8]. Random
weights make no claim about segmentation quality: the tests check the
method's arithmetic and structure, not accuracy.
"""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from persam.data.concept import FORMAT_VERSION, load_concept, save_concept
from persam.method.finetune import FinetuneSettings
from persam.method.guide import attention_similarity
from persam.errors import InputError
from persam.data.io import davis_palette, load_image, load_mask
from persam.method.locate import cell_norms, select_points, similarity_grid, similarity_map
from persam.method.multi import mask_iou, segment_objects
from persam.method.pipeline import Concept, learn_concept, learn_concept_weights, segment, segment_at
from persam.method.refine import MaskChoice, keep_non_empty, mask_box
from persam.method.target import target_cells, target_embedding, target_features, target_vector
from sam.predictor import SamPredictor
from sam.transforms import preprocess_shape
from sam_testing import random_sam

CLASSES = ("cat", "colorful_sneaker", "duck_toy")
IMG_SIZE = 256  # random_sam input side: 16 x 16 grid


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def predictor():
    model, _ = random_sam("vit_b", img_size=IMG_SIZE)
    return SamPredictor(model)


@pytest.fixture(scope="module")
def small(perseg_dir):
    """(class, index) -> (image, mask) of the shared PerSeg subset, downscaled by [::8, ::8]."""
    cache = {}

    def get(cls, index):
        key = (cls, index)
        if key not in cache:
            image = load_image(perseg_dir / "Images" / cls / f"{index:02d}.jpg")
            mask = load_mask(perseg_dir / "Annotations" / cls / f"{index:02d}.png")
            cache[key] = (np.ascontiguousarray(image[::8, ::8]), np.ascontiguousarray(mask[::8, ::8]))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def encoded(predictor, small):
    """(class, index) -> (features, original size) of the downscaled image, encoded once per module."""
    cache = {}

    def get(cls, index):
        key = (cls, index)
        if key not in cache:
            image, _ = small(cls, index)
            cache[key] = (predictor.set_image(image).clone(), image.shape[:2])
        return cache[key]

    return get


def use(predictor, encoded_image):
    """Make an already encoded image the predictor's current one (no re-encoding)."""
    features, size = encoded_image
    predictor.set_embedding(features, size)


@pytest.fixture(scope="module")
def concepts(predictor, small):
    """One concept per method, learned from cat 00 (PerSAM-F with few steps, for speed)."""
    reference = [small("cat", 0)]
    return {
        "persam": learn_concept(predictor, reference, method="persam"),
        "persam_f": learn_concept(predictor, reference, method="persam_f", finetune=FinetuneSettings(steps=20)),
    }


# --------------------------------------------------------------------------- #
# Step 2: location prior
# --------------------------------------------------------------------------- #


def test_select_points_on_planted_map():
    rng = np.random.default_rng(0)
    height, width = 7, 11
    values = rng.uniform(0.2, 0.8, (height, width)).astype(np.float32)
    values[2, 9] = 0.99  # best
    values[5, 3] = 0.95  # second
    values[0, 10] = 0.90  # third
    values[6, 1] = 0.01  # worst
    values[4, 0] = 0.05  # second worst
    similarity = torch.from_numpy(values)

    points, labels = select_points(similarity, k_positive=1, k_negative=1)
    np.testing.assert_array_equal(points, [[9, 2], [1, 6]])  # (x, y): column first
    np.testing.assert_array_equal(labels, [1, 0])
    row, col = np.unravel_index(values.argmax(), values.shape)
    assert tuple(points[0]) == (col, row)

    points, labels = select_points(similarity, k_positive=3, k_negative=2)
    np.testing.assert_array_equal(points, [[9, 2], [3, 5], [10, 0], [1, 6], [0, 4]])  # top-k order, then bottom-k
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0])

    points, labels = select_points(similarity, k_positive=2, k_negative=0)  # PerSAM-F / video: positives only
    np.testing.assert_array_equal(points, [[9, 2], [3, 5]])
    np.testing.assert_array_equal(labels, [1, 1])
    assert points.dtype == np.float32


def test_point_indices_are_topks_also_on_ties_and_nan():
    """select_points finds the extreme from the row extremes (the first of equal ones) and
    leaves NaN, small maps and k > 1 to topk: its indices are topk's on every map."""
    from persam.method.locate import _top_indices

    generator = torch.Generator().manual_seed(0)
    ties = 0
    for trial in range(600):
        height, width = torch.randint(1, 40, (2,), generator=generator).tolist()
        similarity = torch.randn(height, width, generator=generator)
        if trial % 2 == 0:
            similarity = torch.round(similarity)  # many equal extremes
        if trial % 40 == 1:
            similarity[height // 2, width // 2] = float("nan")
        if trial % 40 == 3:
            similarity = F.interpolate(similarity[None, None], scale_factor=4, mode="bilinear")[0, 0]
        for largest in (True, False):
            expected = similarity.flatten().topk(1, largest=largest).indices
            assert torch.equal(_top_indices(similarity, 1, largest), expected), trial
            ties += int((similarity == similarity.flatten()[expected]).sum() > 1 and similarity.numel() >= 64)
        for k in (0, 3):
            k = min(k, similarity.numel())
            expected = similarity.flatten().topk(k).indices
            assert torch.equal(_top_indices(similarity, k, True), expected)
    assert ties > 200  # the first-of-equal-extremes rule was really put to the test


def test_cell_norms_are_torchs_norm_bit_for_bit():
    """cell_norms repeats torch's norm(dim=0) exactly (its summation order and rounding), on
    features of many scales, the decoder's 256 x 64 x 64 and odd shapes, zeros and non-finite cells."""
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 64, 64)] * 12 + [(32, 5, 6), (1, 3, 3), (3, 1, 7), (1024, 8, 8)]
    for index, shape in enumerate(shapes):
        cells = torch.randn(*shape, generator=g) * float(10 ** (index % 7 - 3))
        if index == 1:
            cells[:, 0, 0] = 0
            cells[3, 1, 1] = float("inf")
            cells[4, 2, 2] = float("nan")
            cells[5, 3, 3] = 1e30  # its square overflows
        expected = cells.norm(dim=0, keepdim=True)
        result = cell_norms(cells)
        assert result.shape == expected.shape
        assert torch.equal(result, expected) or torch.equal(result.isnan(), expected.isnan()) and torch.equal(
            result[~result.isnan()], expected[~expected.isnan()]), shape
    # a strided view (a batch's item) and reduced precision (torch's own kernel)
    batch = torch.randn(2, 256, 16, 16, generator=g)
    assert torch.equal(cell_norms(batch[1]), batch[1].norm(dim=0, keepdim=True))
    half = torch.randn(16, 4, 4, generator=g).to(torch.bfloat16)
    assert torch.equal(cell_norms(half), half.norm(dim=0, keepdim=True))


def test_similarity_grid_is_cosine_per_cell():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 32, 5, 6, generator=g)
    vector = torch.randn(32, generator=g)
    vector = vector / vector.norm()
    grid = similarity_grid(features, vector)
    f = features[0].numpy()
    v = vector.numpy()
    expected = np.zeros((5, 6))
    for i in range(5):
        for j in range(6):
            cell = f[:, i, j]
            expected[i, j] = np.dot(v, cell) / (np.linalg.norm(v) * np.linalg.norm(cell))
    np.testing.assert_allclose(grid.numpy(), expected, atol=1e-6)


def test_similarity_map_square_image_matches_mask_upsampling(predictor):
    grid_side = IMG_SIZE // 16
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 256, grid_side, grid_side, generator=g)
    height = width = 72
    predictor.set_embedding(features, (height, width))
    grid = torch.rand(grid_side, grid_side, generator=g)

    result = similarity_map(grid, predictor.upscale)

    # As mask logits: x4 bilinear, to the input frame, crop (nothing to crop: square), to H x W.
    x = F.interpolate(grid[None, None], scale_factor=4, mode="bilinear", align_corners=False)
    assert x.shape[-1] == 4 * grid_side
    x = F.interpolate(x, (IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    x = F.interpolate(x, (height, width), mode="bilinear", align_corners=False)[0, 0]
    assert result.shape == (height, width)
    torch.testing.assert_close(result, x, atol=1e-6, rtol=0)
    # ... which is x4 bilinear followed by the predictor's own upscale
    torch.testing.assert_close(result, predictor.upscale(F.interpolate(grid[None, None], scale_factor=4, mode="bilinear"))[0, 0])


# --------------------------------------------------------------------------- #
# Step 3: target-guided attention
# --------------------------------------------------------------------------- #


def _reference_attention(similarity, grid):
    """The reference's direct computation: z-score, resize the H x W map to grid x grid, sigmoid, flatten."""
    z = (similarity - similarity.mean()) / similarity.std()
    z = F.interpolate(z[None, None], size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.sigmoid(z).flatten()


@pytest.mark.parametrize("side,img_size,grid", [(96, 256, 16), (200, 1024, 64), (1282, 1024, 64)])
def test_attention_similarity_square_equals_reference(side, img_size, grid):
    g = torch.Generator().manual_seed(side)
    similarity = F.interpolate(torch.rand(1, 1, 9, 9, generator=g), (side, side), mode="bilinear")[0, 0]
    input_size = preprocess_shape(side, side, img_size)
    result = attention_similarity(similarity, input_size, grid, img_size)
    assert result.shape == (grid * grid,)
    torch.testing.assert_close(result, _reference_attention(similarity, grid), atol=1e-5, rtol=0)


def test_attention_similarity_non_square_keeps_grid_alignment():
    height, width, grid = 60, 100, IMG_SIZE // 16
    input_size = preprocess_shape(height, width, IMG_SIZE)  # (154, 256): 9.6 rows of cells hold the image
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    blob_y, blob_x = 30.0, 75.0
    similarity = torch.exp(-((ys - blob_y) ** 2 + (xs - blob_x) ** 2) / (2 * 4.0**2))

    attention = attention_similarity(similarity, input_size, grid, IMG_SIZE).reshape(grid, grid)

    z = (similarity - similarity.mean()) / similarity.std()
    # Rows whose cell centre (input frame) lies beyond the resized image are padding: sigmoid(min z).
    centres = (torch.arange(grid) + 0.5) * (IMG_SIZE / grid)
    padded_rows = centres >= input_size[0]
    assert int(padded_rows.sum()) == 6  # rows 10..15
    torch.testing.assert_close(attention[padded_rows], torch.full((6, grid), float(torch.sigmoid(z.min()))))
    # The blob lands in the cell that holds it in the grid frame: y = 30 * 154/60 = 77 -> row 4; x = 75 * 2.56 = 192 -> col 12.
    row, col = divmod(int(attention.argmax()), grid)
    assert (row, col) == (int(blob_y * input_size[0] / height // 16), int(blob_x * input_size[1] / width // 16)) == (4, 12)
    # (The reference's stretch over the whole grid would put it at row 8.)
    stretched = _reference_attention(similarity, grid).reshape(grid, grid)
    assert divmod(int(stretched.argmax()), grid)[0] == 8
    # In-image cells away from the blob sit at the background level, in-image cells are never below the padding.
    assert torch.all(attention[~padded_rows] >= float(torch.sigmoid(z.min())) - 1e-6)
    assert float(attention[0, 0]) == pytest.approx(float(torch.sigmoid(z.min())), abs=1e-3)


# --------------------------------------------------------------------------- #
# Step 1: the target
# --------------------------------------------------------------------------- #


def test_target_vector_modes_and_embedding():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(7, 16)).astype(np.float32)
    t = torch.from_numpy(feats)
    expected = {
        "mean": feats.mean(0),
        "max": feats.max(0),
        "mean_max": (feats.max(0) + feats.mean(0)) / 2,
    }
    for mode, vector in expected.items():
        result = target_vector(t, mode).numpy()
        np.testing.assert_allclose(result, vector / np.linalg.norm(vector), atol=1e-6)
        assert np.linalg.norm(result) == pytest.approx(1.0, abs=1e-6)
    embedding = target_embedding(t)
    assert embedding.shape == (1, 16)
    np.testing.assert_allclose(embedding.numpy()[0], feats.mean(0), atol=1e-6)  # plain mean, not normalised
    with pytest.raises(ValueError, match="target mode"):
        target_vector(t, "median")


def test_target_features_picks_cells():
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    cells = torch.zeros(3, 4, dtype=torch.bool)
    cells[0, 1] = cells[2, 3] = True
    np.testing.assert_array_equal(target_features(features, cells).numpy(), [[1, 13], [11, 23]])


def test_mask_storage_formats_give_same_target(perseg_dir, tmp_path):
    truth = load_mask(perseg_dir / "Annotations" / "duck_toy" / "00.png")
    as_uint8 = truth.astype(np.uint8)
    Image.fromarray(as_uint8).save(tmp_path / "zero_one.png")
    Image.fromarray(as_uint8 * 255).save(tmp_path / "zero_255.png")
    palette = Image.fromarray(as_uint8, mode="L").convert("P")
    palette.putpalette(davis_palette().reshape(-1).tolist())
    palette.save(tmp_path / "palette.png")
    rgb = np.zeros(truth.shape + (3,), np.uint8)
    rgb[truth] = (128, 0, 0)  # PerSeg's red
    Image.fromarray(rgb).save(tmp_path / "rgb.png")

    expected = target_cells(truth)
    assert expected.any()
    for name in ("zero_one", "zero_255", "palette", "rgb"):
        mask = load_mask(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(mask, truth, err_msg=name)
        assert torch.equal(target_cells(mask), expected), name
    # the raw 0/1 and 0/255 arrays, not only the loaded bools (the reference finds no cell in a 0/1 mask)
    assert torch.equal(target_cells(as_uint8), expected)


def test_tiny_mask_still_has_a_target():
    mask = np.zeros((1024, 1024), bool)
    mask[10:13, 10:13] = True  # 9 pixels between the centres (8, 8) and (24, 24) of cells (0, 0) and (1, 1)
    cells = target_cells(mask)
    assert int(cells.sum()) == 1 and bool(cells[0, 0])
    features = torch.randn(1, 8, 64, 64)
    assert target_features(features, cells).shape == (1, 8)
    with pytest.raises(ValueError, match="empty"):
        target_cells(np.zeros((50, 50), bool))


def test_target_cells_on_perseg_are_centre_inside_cells(perseg_dir):
    grid, img_size = 64, 1024
    report = []
    for cls in CLASSES:
        for index in range(3):
            mask = load_mask(perseg_dir / "Annotations" / cls / f"{index:02d}.png")
            height, width = mask.shape
            new_h, new_w = preprocess_shape(height, width, img_size)
            cells = target_cells(mask, tau=0.97).numpy()

            j = np.arange(grid)
            xs = (j + 0.5) * 16 * width / new_w
            ys = (j + 0.5) * 16 * height / new_h
            in_x, in_y = xs < width, ys < height
            inside = np.zeros((grid, grid), bool)
            rows = np.floor(ys[in_y]).astype(int)
            cols = np.floor(xs[in_x]).astype(int)
            inside[np.ix_(in_y, in_x)] = mask[np.ix_(rows, cols)]

            assert not (cells & ~inside).any(), f"{cls}/{index:02d}: a target cell whose centre is outside the object"
            # Distance of every object pixel to the nearest background pixel, Euclidean and chessboard.
            mask_u8 = mask.astype(np.uint8)
            euclidean = cv2.distanceTransform(mask_u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            chessboard = cv2.distanceTransform(mask_u8, cv2.DIST_C, 3)
            scale = max(height, width) / img_size
            # The value sampled at a cell centre mixes two resized pixels, each a triangle filter of radius
            # `scale` source pixels around its centre, half a resized pixel (scale / 2) from the cell centre:
            # only source pixels within 1.5 * scale (+ 0.5 for the floor) per axis can pull it below tau.
            support = 1.5 * scale + 0.5
            missed = np.argwhere(inside & ~cells)
            beyond_one_pixel = 0
            for i, jj in missed:
                y, x = int(np.floor(ys[i])), int(np.floor(xs[jj]))
                assert chessboard[y, x] <= support, (
                    f"{cls}/{index:02d}: cell ({i}, {jj}) missed {chessboard[y, x]:.0f} px inside the object"
                )
                beyond_one_pixel += int(euclidean[y, x] > scale + 1)
            # "About one source pixel": all but a rare cell (sneaker 02 at scale 2: one at 3.16 px, value 0.969)
            # lie within scale + 1 px of the boundary.
            assert beyond_one_pixel <= 1
            report.append(
                f"{cls}/{index:02d}: {int(cells.sum())} target cells, {len(missed)} boundary cells differ "
                f"({beyond_one_pixel} beyond scale + 1 px)"
            )
    print("\n" + "\n".join(report))


# --------------------------------------------------------------------------- #
# Refinement helpers
# --------------------------------------------------------------------------- #


def test_mask_box_and_keep_non_empty():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    mask[7, 1] = True
    np.testing.assert_array_equal(mask_box(mask), [1, 2, 8, 7])  # x0, y0, x1, y1 inclusive
    single = np.zeros((5, 5), bool)
    single[4, 0] = True
    np.testing.assert_array_equal(mask_box(single), [0, 4, 0, 4])
    assert mask_box(np.zeros((5, 5), bool)) is None
    assert mask_box(np.ones((3, 4), bool)).tolist() == [0, 0, 3, 2]

    logits = np.zeros((4, 4), np.float32)
    full = MaskChoice(mask, logits, 0.9)
    empty = MaskChoice(np.zeros_like(mask), logits, 0.99)
    other = MaskChoice(single, logits, 0.5)
    assert keep_non_empty(empty, full) is full  # an empty result never replaces a mask
    assert keep_non_empty(other, full) is other
    both_empty = MaskChoice(np.zeros_like(mask), logits, 0.1)
    assert keep_non_empty(both_empty, empty) is both_empty  # nothing better to keep
    assert empty.is_empty and not full.is_empty


# --------------------------------------------------------------------------- #
# Step 4: PerSAM-F
# --------------------------------------------------------------------------- #


def test_finetune_decode_once_equals_decode_every_step(predictor, small, encoded, concepts):
    reference = [small("duck_toy", 0)]
    features = [encoded("duck_toy", 0)]
    concept = concepts["persam"]
    settings = FinetuneSettings(steps=30)
    once = learn_concept_weights(predictor, concept, reference, features, settings, decode_every_step=False)
    every = learn_concept_weights(predictor, concept, reference, features, settings, decode_every_step=True)
    assert once.shape == (3,)
    assert float((once - every).abs().max()) <= 1e-5
    assert float(once.sum()) == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(once, torch.full((3,), 1 / 3))  # it did learn something


# --------------------------------------------------------------------------- #
# The pipeline
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_learn_and_segment(method, predictor, small, encoded, concepts):
    concept = concepts[method]
    assert concept.method == method
    assert concept.target_vector.shape == (256,)
    assert float(concept.target_vector.norm()) == pytest.approx(1.0, abs=1e-5)
    assert concept.target_embedding.shape == (1, 256)
    assert concept.settings["target_mode"] == ("mean" if method == "persam" else "mean_max")
    if method == "persam_f":
        assert concept.scale_weights.shape == (3,)
    else:
        assert concept.scale_weights is None

    image, _ = small("cat", 1)
    result = segment(predictor, concept, image, keep_similarity=True)
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    n_points = 2 if method == "persam" else 1
    assert result.points.shape == (n_points, 2)
    np.testing.assert_array_equal(result.labels, [1, 0][:n_points])
    assert result.found == bool(result.mask.any())
    assert result.similarity.shape == image.shape[:2]
    assert result.peak_similarity == pytest.approx(float(result.similarity.max()))
    assert -1.0 <= result.peak_similarity <= 1.0 + 1e-6
    x, y = result.points[0].astype(int)
    assert float(result.similarity[y, x]) == pytest.approx(result.peak_similarity)
    if result.found:
        np.testing.assert_array_equal(result.box, mask_box(result.mask))
        assert result.low_res_logits.shape == (4 * (IMG_SIZE // 16),) * 2
    # segmenting the image already set gives the same answer
    again = segment(predictor, concept)
    np.testing.assert_array_equal(again.mask, result.mask)

    # a threshold above the peak: not found, empty mask, no prompt
    missing = segment(predictor, concept, min_similarity=result.peak_similarity + 1e-3)
    assert not missing.found
    assert missing.mask.shape == image.shape[:2] and not missing.mask.any()
    assert missing.points.shape == (0, 2)
    assert missing.peak_similarity == pytest.approx(result.peak_similarity)


def test_two_references_pool_their_cells(predictor, small, encoded):
    references = [small("cat", 0), small("cat", 2)]
    concept = learn_concept(predictor, references, method="persam")
    pooled = []
    for index, (_, mask) in zip((0, 2), references):
        features, _ = encoded("cat", index)
        cells = target_cells(mask, 0.97, features.shape[-1], IMG_SIZE).numpy()
        f = features[0].numpy()  # C x h x w
        pooled.append(f[:, cells].T)
        assert cells.sum() > 0
    pooled = np.concatenate(pooled)
    mean = pooled.mean(0)
    np.testing.assert_allclose(concept.target_vector.numpy(), mean / np.linalg.norm(mean), atol=1e-5)
    np.testing.assert_allclose(concept.target_embedding.numpy()[0], mean, atol=1e-5)


# --------------------------------------------------------------------------- #
# Concept files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["persam", "persam_f"])
def test_concept_round_trip(method, predictor, encoded, concepts, tmp_path):
    concept = concepts[method]
    path = tmp_path / "sub" / f"{method}.concept"
    save_concept(concept, path, model_type="vit_b", checkpoint_sha256="ab" * 32)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    loaded = load_concept(path, model_type="vit_b", checkpoint_sha256="AB" * 32)
    assert loaded.method == concept.method
    assert torch.equal(loaded.target_vector, concept.target_vector)
    assert torch.equal(loaded.target_embedding, concept.target_embedding)
    assert loaded.settings == concept.settings
    assert loaded.model_type == "vit_b" and loaded.checkpoint_sha256 == "ab" * 32
    if method == "persam_f":
        assert torch.equal(loaded.scale_weights, concept.scale_weights)

    raw = torch.load(path, weights_only=True)
    assert raw["version"] == FORMAT_VERSION

    use(predictor, encoded("duck_toy", 1))  # a new image
    first = segment(predictor, concept)
    second = segment(predictor, loaded)
    np.testing.assert_array_equal(first.mask, second.mask)
    assert first.iou_score == second.iou_score
    np.testing.assert_array_equal(first.points, second.points)


def test_concept_from_another_model_is_refused(concepts, tmp_path):
    path = tmp_path / "cat.concept"
    concept = concepts["persam"]
    concept_b = Concept(**{**vars(concept), "model_type": "vit_b", "checkpoint_sha256": "12" * 32})
    save_concept(concept_b, path)
    with pytest.raises(InputError, match=r"concept .*cat\.concept was learned with vit_b \(sha 121212121212\), not vit_t"):
        load_concept(path, model_type="vit_t")
    with pytest.raises(InputError, match="was learned with vit_b"):
        load_concept(path, model_type="vit_b", checkpoint_sha256="34" * 32)
    assert load_concept(path).model_type == "vit_b"  # nothing asked, nothing checked


def test_bad_concept_files_raise_input_error(concepts, tmp_path):
    missing = tmp_path / "missing.concept"
    with pytest.raises(InputError, match=f"concept {missing}: file not found"):
        load_concept(missing)

    good = tmp_path / "good.concept"
    save_concept(concepts["persam"], good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.concept"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.concept"
    garbage.write_bytes(b"not a concept at all\x00\x01")
    other = tmp_path / "other.concept"
    torch.save({"weights": torch.zeros(3)}, other)
    for path in (truncated, garbage, other):
        with pytest.raises(InputError, match=f"concept {path}"):
            load_concept(path)

    newer = tmp_path / "newer.concept"
    record = torch.load(good, weights_only=True)
    torch.save({**record, "version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(InputError, match="newer"):
        load_concept(newer)


# --------------------------------------------------------------------------- #
# Several objects in one image
# --------------------------------------------------------------------------- #


def _three_copies(image, mask, gap=8, background=(40, 90, 40)):
    """Crop the object's box and paste three copies side by side on a plain background; their masks."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop, crop_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    h, w = crop_mask.shape
    canvas = np.empty((h + 2 * gap, 3 * w + 4 * gap, 3), np.uint8)
    canvas[:] = background
    masks = []
    for k in range(3):
        left = gap + k * (w + gap)
        canvas[gap:gap + h, left:left + w][crop_mask] = crop[crop_mask]
        copy_mask = np.zeros(canvas.shape[:2], bool)
        copy_mask[gap:gap + h, left:left + w] = crop_mask
        masks.append(copy_mask)
    return canvas, masks


def test_segment_objects_finds_copies_encoding_once(predictor, small, monkeypatch):
    image, masks = _three_copies(*small("duck_toy", 0))
    concept = learn_concept(predictor, [(image, masks[0])], method="persam")
    similarity = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
    copy_peaks = [float(similarity[torch.from_numpy(m)].max()) for m in masks]
    background_peak = float(similarity[torch.from_numpy(~np.any(masks, axis=0))].max())
    # Random encoder, but identical copies: each copy's peak beats the plain background.
    assert min(copy_peaks) > background_peak
    min_similarity = (min(copy_peaks) + background_peak) / 2

    calls = []
    original = predictor.set_image
    monkeypatch.setattr(predictor, "set_image", lambda img: calls.append(1) or original(img))
    objects = segment_objects(predictor, concept, image, max_objects=5, min_similarity=min_similarity)
    assert len(calls) == 1  # encoded once, never again

    # What holds by construction, whatever the random decoder draws:
    # every kept object passed the similarity threshold and is non-empty, no two overlap by IoU >= 0.8,
    # and each positive point lies outside every earlier mask (those pixels were suppressed to the minimum).
    assert 2 <= len(objects) <= 5
    for k, obj in enumerate(objects):
        assert obj.found and obj.mask.any() and obj.peak_similarity >= min_similarity
        x, y = obj.points[0].astype(int)
        for earlier in objects[:k]:
            assert mask_iou(obj.mask, earlier.mask) < 0.8
            assert not earlier.mask[y, x]
            assert not np.array_equal(obj.points[0], earlier.points[0])
    # Every positive lands on a copy (the background peak is below the threshold). The random decoder
    # draws small masks, so one copy can be found more than once (with this seeded model at least two
    # different copies are hit); mask quality is not what is checked here.
    hit = []
    for obj in objects:
        x, y = obj.points[0].astype(int)
        on = [k for k, m in enumerate(masks) if m[y, x]]
        assert len(on) == 1
        hit.append(on[0])
    assert len(set(hit)) >= 2
    # The negative point comes from the original map (its argmin), never from the suppressed one,
    # whose minimum is shared by every pixel of the objects found so far.
    negative = select_points(similarity, k_positive=0, k_negative=1)[0][0]
    for obj in objects:
        np.testing.assert_array_equal(obj.points[obj.labels == 0], negative[None])


def test_negative_point_from_original_map_not_inside_found_object(predictor, encoded, concepts):
    """After suppression, a found object's pixels all hold the map's minimum: the negative point
    (argmin) must come from the original map, not from a tie inside the found object."""
    use(predictor, encoded("cat", 1))
    concept = concepts["persam"]
    original = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
    height, width = original.shape
    # a "found object": every pixel above the median similarity (the map's minimum is not among them)
    found = (original > original.median()).numpy()
    suppressed = original.clone()
    suppressed[torch.from_numpy(found)] = original.min()
    # the premise: in the suppressed map the whole found object shares the minimum
    assert int((suppressed == suppressed.min()).sum()) > found.sum()
    expected = select_points(original, k_positive=0, k_negative=1)[0]

    result = segment_at(predictor, concept, suppressed, negative_similarity=original)
    negatives = result.points[result.labels == 0]
    assert negatives.shape == (1, 2)
    x, y = negatives[0].astype(int)
    np.testing.assert_array_equal(negatives, expected)
    assert not found[y, x]
    # the positive point still comes from the suppressed map
    pos_y, pos_x = divmod(int(suppressed.flatten().argmax()), width)
    np.testing.assert_array_equal(result.points[result.labels == 1], [[pos_x, pos_y]])
    # without it, the same map gives the same positive (and the old negative); shapes are checked
    plain = segment_at(predictor, concept, suppressed)
    np.testing.assert_array_equal(plain.points[0], result.points[0])
    with pytest.raises(ValueError, match="negative_similarity"):
        segment_at(predictor, concept, suppressed, negative_similarity=original[:-1])


def test_segment_objects_limits(predictor, small, encoded, concepts):
    use(predictor, encoded("cat", 1))
    concept = concepts["persam"]
    one = segment_objects(predictor, concept, max_objects=1)
    single = segment(predictor, concept)
    assert len(one) == 1
    np.testing.assert_array_equal(one[0].mask, single.mask)  # the first object is plain `segment`
    # IoU >= 0 always holds: the second candidate is rejected as overlapping
    assert len(segment_objects(predictor, concept, max_objects=5, max_overlap_iou=0.0)) == 1
    # a threshold above the peak: nothing
    assert segment_objects(predictor, concept, min_similarity=single.peak_similarity + 1e-3) == []
    assert segment_objects(predictor, concept, max_objects=0) == []
