"""A reference mask from clicks or a box: SAM's best multimask output that is a real object."""

import numpy as np
import pytest

from persam.method.target import reference_mask_from_prompts
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


# --------------------------------------------------------------------------------------------
# `persam learn / segment`: which reference image each prompt belongs to (issue 23, item 10)


def _prompts(*argv):
    from persam.cli import commands as cli
    from persam.cli.references import reference_prompts

    args = cli.build_parser().parse_args(["learn", *argv, "--out", "c.pt"])
    return [(p.image, p.mask, p.points, p.box) for p in reference_prompts(args)]


def test_each_prompt_belongs_to_the_reference_image_it_follows():
    assert _prompts("--ref-image", "a.jpg", "--ref-point", "1,2", "--ref-point", "3,4",
                    "--ref-image", "b.jpg", "--ref-box", "0,0,5,6") == [
        ("a.jpg", None, [(1.0, 2.0), (3.0, 4.0)], None), ("b.jpg", None, None, (0.0, 0.0, 5.0, 6.0))]
    # a mask for one, a click for another, a box for a third
    assert _prompts("--ref-image", "a.jpg", "--ref-mask", "a.png", "--ref-image", "b.jpg", "--ref-point", "7,8",
                    "--ref-image", "c.jpg", "--ref-box", "1,1,4,4") == [
        ("a.jpg", "a.png", None, None), ("b.jpg", None, [(7.0, 8.0)], None), ("c.jpg", None, None, (1.0, 1.0, 4.0, 4.0))]


def test_the_forms_accepted_before_stay_accepted():
    # one reference image: its prompts in any order around it
    assert _prompts("--ref-point", "1,2", "--ref-image", "a.jpg", "--ref-point", "3,4") == [
        ("a.jpg", None, [(1.0, 2.0), (3.0, 4.0)], None)]
    assert _prompts("--ref-box", "0,0,5,6", "--ref-image", "a.jpg") == [("a.jpg", None, None, (0.0, 0.0, 5.0, 6.0))]
    # masks only: the k-th mask is the k-th image's, wherever it is given
    assert _prompts("--ref-image", "a.jpg", "--ref-image", "b.jpg", "--ref-mask", "a.png", "--ref-mask", "b.png") == [
        ("a.jpg", "a.png", None, None), ("b.jpg", "b.png", None, None)]


@pytest.mark.parametrize("argv, words", [
    (["--ref-point", "1,2", "--ref-image", "a.jpg", "--ref-image", "b.jpg", "--ref-box", "0,0,5,6"],
     ["--ref-point 1,2", "before"]),
    (["--ref-image", "a.jpg", "--ref-image", "b.jpg", "--ref-point", "1,2"], ["a.jpg", "no --ref-mask"]),
    (["--ref-image", "a.jpg", "--ref-point", "1,2", "--ref-box", "0,0,5,6", "--ref-image", "b.jpg", "--ref-point", "3,3"],
     ["a.jpg", "not both"]),
    (["--ref-image", "a.jpg", "--ref-box", "0,0,5,6", "--ref-box", "1,1,5,6", "--ref-image", "b.jpg",
      "--ref-point", "3,3"], ["a.jpg", "one --ref-box"]),
    (["--ref-image", "a.jpg", "--ref-mask", "a.png", "--ref-point", "1,1", "--ref-image", "b.jpg", "--ref-point", "3,3"],
     ["a.jpg", "not both"]),
    (["--ref-image", "a.jpg", "--ref-mask", "a.png", "--ref-mask", "b.png"], ["1 --ref-image", "2 --ref-mask"]),
    (["--ref-image", "a.jpg", "--ref-image", "b.jpg", "--ref-mask", "a.png"], ["2 --ref-image", "1 --ref-mask"]),
    (["--ref-image", "a.jpg", "--ref-box", "0,0,5,6", "--ref-box", "1,1,5,6"], ["one --ref-box"]),
    (["--ref-image", "a.jpg"], ["--ref-mask MASK", "--ref-point X,Y", "--ref-box"]),
])
def test_ambiguous_reference_prompts_are_refused_in_one_line(argv, words):
    from persam.errors import InputError

    with pytest.raises(InputError) as caught:
        _prompts(*argv)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
