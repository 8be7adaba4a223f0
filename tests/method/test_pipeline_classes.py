"""The PerSAM / PerSAMF classes are thin: the same results as the functions they compose."""

import numpy as np

from persam.method.finetune import FinetuneSettings
from persam.data.io import load_image, load_mask
from persam.method.pipeline import PerSAM, PerSAMF, learn_concept, segment
from sam.predictor import SamPredictor
from sam_testing import random_sam


def test_classes_match_the_functions(perseg_dir):
    model, _ = random_sam("vit_b", img_size=256, seed=7)
    predictor = SamPredictor(model)
    reference = load_image(perseg_dir / "Images" / "duck_toy" / "00.jpg")[::8, ::8].copy()
    mask = load_mask(perseg_dir / "Annotations" / "duck_toy" / "00.png")[::8, ::8].copy()
    target = load_image(perseg_dir / "Images" / "duck_toy" / "01.jpg")[::8, ::8].copy()

    concept = PerSAM(predictor).learn(reference, mask)
    assert concept.method == "persam" and concept.settings["target_mode"] == "mean"
    expected = segment(predictor, learn_concept(predictor, [(reference, mask)]), target)
    assert np.array_equal(PerSAM(predictor).segment(target, concept).mask, expected.mask)

    settings = FinetuneSettings(steps=20)
    concept_f = PerSAMF(predictor, finetune=settings).learn(reference, mask, (reference[:, ::-1].copy(), mask[:, ::-1].copy()))
    assert concept_f.method == "persam_f" and concept_f.settings["target_mode"] == "mean_max"
    assert concept_f.scale_weights.shape == (3,)
    expected_f = learn_concept(
        predictor, [(reference, mask), (reference[:, ::-1].copy(), mask[:, ::-1].copy())], "persam_f", finetune=settings
    )
    assert np.allclose(concept_f.scale_weights, expected_f.scale_weights, atol=1e-6)

    absent = PerSAM(predictor, min_similarity=2.0).segment(target, concept)
    assert not absent.found and not absent.mask.any()
