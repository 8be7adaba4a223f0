"""A reference mask from clicks or a box: SAM's best multimask output that is a real object."""

import numpy as np
import pytest

from persam.target import reference_mask_from_prompts
from sam.predictor import Prediction


class PlantedPredictor:
    """Returns planted masks and scores, and records the prompts it was given."""

    def __init__(self, masks, scores):
        self.masks, self.scores, self.calls = np.asarray(masks), np.asarray(scores, dtype=np.float32), []

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        self.calls.append((point_coords, point_labels, box, multimask_output))
        n = len(self.masks)
        return Prediction(self.masks, self.scores, np.zeros((n, 4, 4)), self.masks.astype(np.float32))


def _masks():
    empty = np.zeros((6, 8), bool)
    full = np.ones((6, 8), bool)
    small = empty.copy()
    small[2:4, 3:6] = True
    large = empty.copy()
    large[1:5, 1:7] = True
    return empty, full, small, large


def test_best_real_object_is_chosen_over_empty_and_full_masks():
    empty, full, small, large = _masks()
    predictor = PlantedPredictor([empty, small, large, full], [0.99, 0.5, 0.7, 0.98])
    mask = reference_mask_from_prompts(predictor, points=[[4, 3], [5, 2]])
    assert np.array_equal(mask, large)
    coords, labels, box, multimask = predictor.calls[0]
    assert coords.shape == (2, 2) and labels.tolist() == [1, 1] and box is None and multimask


def test_box_prompt_and_no_usable_mask():
    empty, full, small, _ = _masks()
    predictor = PlantedPredictor([small, empty], [0.2, 0.9])
    assert np.array_equal(reference_mask_from_prompts(predictor, box=[1, 1, 6, 5]), small)
    assert predictor.calls[0][2].tolist() == [1, 1, 6, 5]
    assert reference_mask_from_prompts(PlantedPredictor([empty, full], [0.5, 0.6]), points=[[1, 1]]) is None


def test_clicks_or_box_but_not_both():
    predictor = PlantedPredictor(_masks()[:1], [1.0])
    with pytest.raises(ValueError):
        reference_mask_from_prompts(predictor)
    with pytest.raises(ValueError):
        reference_mask_from_prompts(predictor, points=[[1, 1]], box=[0, 0, 2, 2])
