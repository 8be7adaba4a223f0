"""GF-SAM's steps on hand-made inputs, and the method end to end on drawn photos (no mirror needed).

End to end, DINOv2 and SAM are stand-ins that make the answer knowable: a DINOv2 whose patch
features are the patch's colour, and a SamPredictor (SAM's geometry: resize, padding, prompt
scaling, upscaling) whose decoder returns the connected region of about the point's colour.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from persam.errors import InputError
from persam.method import gfsam as G
from persam.method import gfsam_graph as graph
from sam.predictor import SamPredictor
from sam_testing import random_sam

# ------------------------------------------------------------------------------------------
# priors and points


def test_similarity_prior_takes_the_best_and_the_mean_match_of_the_region():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    weights = torch.tensor([1.0, 0.0, 1.0])  # tokens 0 and 2 are the object
    max_prior, mean_prior = G.similarity_prior(target, [(reference, weights)])
    cos45 = 1 / np.sqrt(2)
    np.testing.assert_allclose(max_prior, [1.0, cos45], atol=1e-6)
    # the weighted mean over the 3 tokens divided by the weights' mean (2/3): the region's mean
    np.testing.assert_allclose(mean_prior, [(1 + cos45) / 2, cos45 / 2], atol=1e-5)
    # two references: each prior is their average
    other = (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0]))
    max2, mean2 = G.similarity_prior(target, [(reference, weights), other])
    np.testing.assert_allclose(max2, [(1.0 + 0.0) / 2, (cos45 + 1.0) / 2], atol=1e-6)
    np.testing.assert_allclose(mean2, [((1 + cos45) / 2 + 0) / 2, (cos45 / 2 + 1) / 2], atol=1e-5)


def test_token_features_are_normalised_over_the_tokens():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

        def patch_features(self, x):
            return self.scale.view(1, 2, 1, 1) * x[:, :1, ::14, ::14].expand(-1, 2, -1, -1) + 1

    tokens = G.token_features(Constant(), torch.zeros(1, 3, 28, 42))
    assert tokens.shape == (6, 2)
    np.testing.assert_allclose(tokens.norm(dim=0), [1.0, 1.0], atol=1e-6)  # per channel, not per token


def test_filtered_prior_keeps_only_where_the_positive_mix_beats_the_negative():
    max_prior = torch.tensor([1.0, 0.5, 0.2, 0.9])
    mean_prior = torch.tensor([1.0, 0.6, 0.1, 0.8])
    negative = torch.tensor([0.0, 1.0, 0.5, 0.1])
    filtered = G.filtered_prior(max_prior, mean_prior, negative)
    mixed = (max_prior * mean_prior - 0.02) / (1.0 - 0.02 + 1e-6)
    scaled_negative = negative / (1 + 1e-6)
    expected = torch.where(scaled_negative > mixed, torch.zeros(4), mixed)
    np.testing.assert_allclose(filtered, expected, atol=1e-6)
    assert filtered[1] == 0 and filtered[0] > 0.99 and filtered[3] > 0


def test_top_cells_count_order_and_cap():
    prior = torch.zeros(4, 5)
    prior[0, 3], prior[2, 1], prior[1, 1], prior[3, 4] = 0.9, 0.8, 0.7, 0.6  # sum 3.0: three cells
    cells = G.top_cells(prior)
    # (column, row), ordered by column then row; the 0.6 cell is the fourth and not taken
    np.testing.assert_array_equal(cells, [[1, 1], [1, 2], [3, 0]])
    assert len(G.top_cells(prior, max_points=2)) == 2
    small = torch.zeros(4, 5)
    small[2, 2] = 0.4  # a sum below 1 still gives its best cell
    np.testing.assert_array_equal(G.top_cells(small), [[2, 2]])
    assert len(G.top_cells(torch.zeros(4, 5))) == 0


def test_prompt_points_are_truncated_cell_corners():
    cells = np.array([[0, 0], [1, 2], [36, 36]])
    points = G.prompt_points(cells, (37, 37), (1024, 1024))
    np.testing.assert_array_equal(points, [[0, 0], [27, 55], [996, 996]])  # 1024/37 = 27.68 per cell
    wide = G.prompt_points(np.array([[10, 5]]), (26, 52), (512, 1024))
    np.testing.assert_array_equal(wide, [[int(10 * 1024 / 52), int(5 * 512 / 26)]])


def test_feature_grid_keeps_the_aspect_and_the_token_count():
    assert G.feature_grid(1024, 1024) == (37, 37)
    rows, cols = G.feature_grid(512, 1024)
    assert (rows, cols) == (26, 52) and abs(rows * cols - 37 * 37) < 60
    assert G.feature_grid(10, 4000) == (2, 740) and G.feature_grid(1, 5000) == (1, 1369)
    pixels = G.dinov2_pixels(np.zeros((512, 1024, 3), np.uint8), (rows, cols))
    assert pixels.shape == (1, 3, 26 * 14, 52 * 14)
    np.testing.assert_allclose(pixels[0, :, 0, 0], -np.array(G.IMAGENET_MEAN) / np.array(G.IMAGENET_STD), atol=1e-6)


# ------------------------------------------------------------------------------------------
# graph steps


def test_graph_edges_and_weak_components():
    nearest = torch.zeros(4, 3, 3, dtype=torch.bool)
    cells = np.array([[0, 0], [2, 0], [2, 2], [0, 2]])  # (column, row)
    nearest[0, 0, 2] = True  # mask 0 covers point 1's cell: edge 0 -> 1
    nearest[2, 0, 2] = True  # mask 2 covers point 1's cell: edge 2 -> 1 (0 and 2 only weakly joined)
    for i, (column, row) in enumerate(cells):
        nearest[i, row, column] = True  # each mask covers its own point
    adjacency = graph.point_mask_graph(nearest, cells)
    assert adjacency[0, 1] and adjacency[2, 1] and not adjacency[1, 0] and adjacency.trace() == 4
    count, labels = graph.weak_components(adjacency)
    assert count == 2
    np.testing.assert_array_equal(labels, [0, 0, 0, 1])


def test_weak_components_number_as_scipy_does():
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    generator = np.random.default_rng(0)
    for size, density in [(1, 0.5), (7, 0.1), (40, 0.03), (128, 0.01), (128, 0.003)]:
        adjacency = generator.random((size, size)) < density
        count, labels = graph.weak_components(adjacency)
        expected_count, expected = csgraph.connected_components(adjacency.astype(np.float32), directed=True,
                                                                connection="weak")
        assert count == expected_count
        np.testing.assert_array_equal(labels, expected)


def test_mask_growth_adds_masks_best_first_while_they_add_positive_area():
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:, :2] = True  # the positive region: the left half
    score = torch.where(region, 1.0, -1.0)
    masks = torch.zeros(4, 4, 4)
    masks[0, :3, :2] = 1  # 6 positive cells: mean score 1, first
    masks[1, :, 2:] = 1  # right half, 8 negative cells: last
    masks[2, :2, :3] = 1  # 4 positive, 2 negative: second, and beyond mask 0 it adds 2 negative cells
    masks[3, :, :3] = 1  # its own component: 8 positive, 4 negative cells
    labels = np.array([0, 0, 0, 1])
    grown, last = graph.grow_masks(masks, labels, 2, score, region)
    assert grown.tolist() == [True, False, False, True]
    # component 0 tries 0, 2, then 1 (the lowest mean score) last: its score is mask 1's
    assert last[0] == last[1] == last[2] == -8.0
    assert last[3] == 8.0 - 4.0


def test_point_consistency_votes_per_component():
    # 2 x 3 grid: the left column is one kind of token, the rest another
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    self_similarity = G.token_similarity(tokens, tokens)
    unions = torch.zeros(2, 2, 3)
    unions[0, :, 0] = 1  # component 0: the left column
    unions[1, :, 1:] = 1  # component 1: the rest
    cells = np.array([[0, 0], [0, 1], [2, 0], [2, 1]])
    labels = np.array([0, 0, 1, 1])
    grown = torch.tensor([True, False, True, False])
    point_labels = graph.point_consistency(self_similarity, unions, cells, labels, 2, grown)
    np.testing.assert_array_equal(point_labels, [graph.KEPT, graph.CANDIDATE, graph.KEPT, graph.CANDIDATE])
    # the points of component 1 moved into the left column: more similar to component 0 -> dropped
    moved = np.array([[0, 0], [0, 1], [0, 0], [0, 1]])
    relabelled = graph.point_consistency(self_similarity, unions, moved, labels, 2, torch.zeros(4, dtype=torch.bool))
    assert relabelled[2] == relabelled[3] == graph.DROPPED and relabelled[0] == graph.CANDIDATE


def test_selection_takes_kept_masks_else_the_best_candidate():
    nonempty = np.ones(4, bool)
    scores = torch.tensor([0.5, 3.0, 2.0, -1.0])
    labels = np.array([graph.KEPT, graph.CANDIDATE, graph.DROPPED, graph.KEPT])
    assert graph.select_masks(labels, scores, nonempty) == [0, 3]
    none_kept = np.array([graph.CANDIDATE, graph.DROPPED, graph.CANDIDATE, graph.DROPPED])
    assert graph.select_masks(none_kept, scores, nonempty) == [2]
    # kept masks that are all empty: the fallback too
    assert graph.select_masks(labels, scores, np.array([False, True, True, False])) == [1]
    # candidates all below 0: the official argmax lands on the first zeroed point (quirk)
    negative = torch.tensor([-2.0, -1.0, -3.0, -4.0])
    quirk = np.array([graph.CANDIDATE, graph.DROPPED, graph.CANDIDATE, graph.DROPPED])
    assert graph.select_masks(quirk, negative, nonempty) == [1]


def test_component_unions_are_downsampled_from_the_full_union():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 4:] = True
    masks[2, :, :] = False
    unions = graph.component_unions(masks, np.array([0, 0, 1]), 2, (2, 2))
    np.testing.assert_allclose(unions[0], [[1, 0], [0, 1]])
    assert unions[1].sum() == 0


# ------------------------------------------------------------------------------------------
# the method end to end, with stand-ins


class ColourDINOv2(torch.nn.Module):
    """DINOv2's interface; a patch's features are its mean colour and their negatives (local)."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.eye(3))

    def patch_features(self, x):
        colour = F.avg_pool2d(x, 14)
        mixed = torch.einsum("oc,bchw->bohw", self.mix, colour)
        return torch.cat([F.relu(mixed), F.relu(-mixed)], dim=1)


class ColourRegionPredictor(SamPredictor):
    """SamPredictor with SAM's geometry but stand-in networks: the embedding carries the input
    frame's colours (at the low-res logits' resolution), and a point's mask is the connected
    region of about the point's colour."""

    def encode(self, model_input):
        colours = F.avg_pool2d(model_input, 4)  # B x 3 x 4g x 4g
        packed = F.pixel_unshuffle(colours, 4)  # B x 48 x g x g
        return F.pad(packed, (0, 0, 0, 0, 0, 256 - packed.shape[1]))

    def _decode(self, features, points, boxes, mask_input, multimask_output, attention_similarity, target_embedding,
                best_only):
        colours = F.pixel_shuffle(features[:, :48].contiguous(), 4)[0]  # 3 x 4g x 4g
        side = colours.shape[-1]
        logits = []
        for (x, y) in points[0][:, 0].tolist():
            column, row = min(int(x / 4), side - 1), min(int(y / 4), side - 1)
            alike = ((colours - colours[:, row, column, None, None]).abs().sum(0) < 0.8).numpy()
            regions, _ = ndimage.label(alike)
            logits.append(torch.from_numpy(np.where(regions == regions[row, column], 10.0, -10.0)).float())
        low_res = torch.stack(logits)[:, None]
        return low_res, torch.ones(len(logits), 1)


def _disc(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _photo(shape, discs, seed=0):
    """A greenish noisy photo with coloured discs [(centre, radius, rgb)]."""
    generator = np.random.default_rng(seed)
    image = np.empty((*shape, 3), np.float64)
    image[:] = (90, 140, 90)
    image += generator.normal(0, 6, image.shape)
    for centre, radius, colour in discs:
        image[_disc(shape, centre, radius)] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


RED, BLUE = (210, 30, 30), (40, 50, 200)
TARGET_DISCS = [((100, 110), 40, RED), ((200, 330), 45, RED), ((220, 120), 35, BLUE)]


@pytest.fixture(scope="module")
def stand_in():
    model, _ = random_sam("vit_b", seed=0)  # only its geometry is used (1024 input frame)
    gfsam = G.GFSAM(ColourRegionPredictor(model, backend="torch"), ColourDINOv2())
    reference = _photo((280, 280), [((140, 140), 70, (200, 35, 40))], seed=1)
    concept = gfsam.learn(reference, _disc((280, 280), (140, 140), 70))
    return gfsam, concept


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_every_instance_is_found_and_the_distractor_is_not(stand_in):
    gfsam, concept = stand_in
    shape = (300, 450)
    found = gfsam.segment(_photo(shape, TARGET_DISCS), concept)
    reds = [_disc(shape, centre, radius) for centre, radius, colour in TARGET_DISCS if colour == RED]
    assert found.found and len(found.instances) == 2
    assert _iou(found.mask, reds[0] | reds[1]) > 0.9
    assert not (found.mask & _disc(shape, (220, 120), 35)).any()
    assert 0.9 < found.score <= 1.0 + 1e-6
    assert found.points.shape[1] == 2 and len(found.point_labels) == len(found.points)


def test_a_padded_photo_gives_the_same_objects(stand_in):
    gfsam, concept = stand_in
    photo = _photo((300, 450), TARGET_DISCS)
    padded = np.zeros((300 + 40 + 70, 450 + 60 + 130, 3), np.uint8)  # zero borders, another aspect
    padded[40:340, 60:510] = photo
    plain = gfsam.segment(photo, concept)
    framed = gfsam.segment(padded, concept)
    assert len(plain.instances) == len(framed.instances) == 2
    assert _iou(plain.mask, framed.mask[40:340, 60:510]) > 0.9
    assert not framed.mask[:40].any() and not framed.mask[:, :60].any()


def test_not_found_below_min_similarity(stand_in):
    gfsam, concept = stand_in
    photo = _photo((300, 450), TARGET_DISCS)
    score = gfsam.segment(photo, concept).score
    strict = G.GFSAM(gfsam.predictor, gfsam.dinov2, G.GFSAMSettings(min_similarity=score + 1e-4))
    absent = strict.segment(photo, concept)
    assert not absent.found and not absent.mask.any() and absent.instances == []
    # the score of the answer, or (SAM not run) the image's peak prior, which is at least that
    assert score - 1e-6 <= absent.score < score + 1e-4
    never = G.GFSAM(gfsam.predictor, gfsam.dinov2, G.GFSAMSettings(min_similarity=2.0)).segment(photo, concept)
    assert not never.found and len(never.points) == 0 and never.score < 2.0  # SAM not run
    lenient = G.GFSAM(gfsam.predictor, gfsam.dinov2, G.GFSAMSettings(min_similarity=score - 1e-4))
    assert lenient.segment(photo, concept).found


def test_bad_references_and_concepts_are_refused(stand_in):
    gfsam, concept = stand_in
    image = _photo((60, 80), [])
    with pytest.raises(InputError, match="reference 1: the mask is empty"):
        gfsam.learn(image, np.zeros((60, 80), bool))
    with pytest.raises(InputError, match="reference 2: the mask covers the whole image"):
        gfsam.learn(image, _disc((60, 80), (30, 40), 10), (image, np.ones((60, 80), bool)))
    with pytest.raises(InputError, match="shape"):
        gfsam.learn(image, np.ones((61, 80), bool))
    two = gfsam.learn(image, _disc((60, 80), (30, 40), 10), (image[:, :50], _disc((60, 50), (30, 25), 9)))
    assert len(two.references) == 2 and two.references[1].grid != two.references[0].grid
    other = G.GFSAMConcept(concept.references, dinov2_variant="vitl14")
    with pytest.raises(InputError, match="DINOv2"):
        gfsam.segment(image, other)
