"""Our SAM 2.1 image side gives Meta's outputs for the same weights (Meta's `sam2` 1.1.0 as reference):
state-dict keys and shapes of all four sizes, image-encoder features, the mask decoder (points, boxes as
points, mask prompts, multimask and single with the stability fallback, object scores), the frame and
mask transforms, and checkpoint loading with one-line errors."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DAVIS, write_random_checkpoint
from sam.checkpoint import CheckpointError
from sam.sam2.build import SAM2_CONFIGS, build_sam2, guess_sam2_variant, load_sam2
from sam.sam2.transforms import frame_to_input, mask_to_input, points_to_input
from sam2_testing import official_sam2_model, random_sam2, random_sam2_state

CAR_SHADOW = DAVIS / "JPEGImages" / "480p" / "car-shadow"


@pytest.fixture(scope="module")
def official_sam2():
    from sam2_testing import import_official_sam2

    return import_official_sam2()


# hiera_t is compared at 1024 px below; hiera_l at 128 px (its forward at 256 costs as much as the others'
# together), where every stage pads its windows
SMALL_SIZES = {"sam2.1_hiera_s": 256, "sam2.1_hiera_b+": 256, "sam2.1_hiera_l": 128}


@pytest.mark.parametrize("variant", list(SMALL_SIZES))
def test_keys_and_small_features_match_official(official_sam2, variant):
    """Same keys and shapes as Meta's model; with the same random weights, the same features at a small size."""
    size = SMALL_SIZES[variant]
    with torch.device("meta"):
        ours_shapes = {key: tuple(value.shape) for key, value in build_sam2(variant).state_dict().items()}
    ours, state = random_sam2(variant, seed=3, image_size=size)
    official = official_sam2_model(variant, state, image_size=size)
    assert ours_shapes == {key: tuple(value.shape) for key, value in official.state_dict().items()}
    assert guess_sam2_variant(state) == variant

    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours_out, official_out = ours.forward_image(image), official.forward_image(image)
    assert [tuple(f.shape) for f in ours_out["backbone_fpn"]] == [(1, 32, size // 4, size // 4), (1, 64, size // 8, size // 8),
                                                                  (1, 256, size // 16, size // 16)]
    for key in ("backbone_fpn", "vision_pos_enc"):
        for level, (a, b) in enumerate(zip(ours_out[key], official_out[key])):
            assert (a - b).abs().max().item() <= 1e-4, f"{variant} {key}[{level}]"
    del ours, official


@pytest.fixture(scope="module")
def tiny_pair(official_sam2):
    """hiera_t with seeded random weights, ours and Meta's, and both encodings of one 1024 x 1024 frame."""
    ours, state = random_sam2("sam2.1_hiera_t", seed=0)
    official = official_sam2_model("sam2.1_hiera_t", state)
    if (CAR_SHADOW / "00000.jpg").is_file():
        frame = frame_to_input(Image.open(CAR_SHADOW / "00000.jpg"))[None]
    else:  # without the shared data: a random frame
        frame = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_features, official_features = ours.forward_image(frame), official.forward_image(frame)
    return ours, official, ours_features, official_features


def test_image_encoder_matches_official_at_1024(tiny_pair):
    ours_model, official_model, ours, official = tiny_pair
    ours_shapes = {key: tuple(value.shape) for key, value in ours_model.state_dict().items()}
    assert ours_shapes == {key: tuple(value.shape) for key, value in official_model.state_dict().items()}
    assert set(SAM2_CONFIGS) == {"sam2.1_hiera_t"} | set(SMALL_SIZES)  # every size is compared
    shapes = [(1, 32, 256, 256), (1, 64, 128, 128), (1, 256, 64, 64)]
    assert [tuple(f.shape) for f in ours["backbone_fpn"]] == shapes
    assert [tuple(f.shape) for f in ours["vision_pos_enc"]] == [(1, 256) + s[2:] for s in shapes]
    for key in ("backbone_fpn", "vision_pos_enc"):
        for level, (a, b) in enumerate(zip(ours[key], official[key])):
            assert (a - b).abs().max().item() <= 1e-4, f"{key}[{level}]"
    assert ours["vision_features"].abs().max() > 1.0  # random weights that reach the output


PROMPTS = {
    "one click": (torch.tensor([[[500.0, 380.0]]]), torch.tensor([[1]], dtype=torch.int32)),
    "clicks": (torch.tensor([[[500.0, 380.0], [120.0, 900.0], [700.0, 640.0]]]), torch.tensor([[1, 0, 1]], dtype=torch.int32)),
    "box as points": (torch.tensor([[[200.0, 300.0], [800.0, 720.0]]]), torch.tensor([[2, 3]], dtype=torch.int32)),
}


DECODER_CASES = [  # (prompt, multimask output, with a mask prompt)
    ("one click", True, False),
    ("one click", False, False),
    ("clicks", False, True),
    ("box as points", True, True),
    ("box as points", False, False),
    (None, False, True),  # a mask alone: one padding point, as Meta's tracker decodes it
]


@pytest.mark.parametrize("prompt, multimask, with_mask", DECODER_CASES)
def test_mask_decoder_matches_official(tiny_pair, prompt, multimask, with_mask):
    ours, official, ours_features, official_features = tiny_pair
    points = PROMPTS[prompt] if prompt else None
    mask = None
    if with_mask:  # a low-res logit mask (B, 1, 256, 256) as the tracker passes previous masks
        mask = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(5)) * 8
    with torch.no_grad():
        a = ours.forward_sam_heads(ours_features["backbone_fpn"][2], point_inputs=points, mask_inputs=mask,
                                   high_res_features=ours_features["backbone_fpn"][:2], multimask_output=multimask)
        official_points = None if points is None else {"point_coords": points[0], "point_labels": points[1]}
        b = official._forward_sam_heads(official_features["backbone_fpn"][2], point_inputs=official_points, mask_inputs=mask,
                                        high_res_features=official_features["backbone_fpn"][:2], multimask_output=multimask)
    assert a.low_res_multimasks.shape == (1, 3 if multimask else 1, 256, 256)
    assert (a.object_score_logits > 0).equal(b[6] > 0)
    assert (a.object_score_logits - b[6]).abs().max().item() <= 1e-4
    for name, ours_value, official_value in zip(a._fields, a, b):
        assert (ours_value - official_value).abs().max().item() <= 1e-3, name


def test_absent_object_matches_official(tiny_pair):
    """Object score below 0 (the score head's bias shifted in both models): masks at Meta's -1024 everywhere,
    the object pointer becomes no_obj_ptr."""
    ours, official, ours_features, official_features = tiny_pair
    coords, labels = PROMPTS["clicks"]
    biases = [model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias for model in (ours, official)]
    try:
        with torch.no_grad():
            for bias in biases:
                bias -= 5.0
            a = ours.forward_sam_heads(ours_features["backbone_fpn"][2], point_inputs=(coords, labels),
                                       high_res_features=ours_features["backbone_fpn"][:2], multimask_output=True)
            b = official._forward_sam_heads(official_features["backbone_fpn"][2],
                                            point_inputs={"point_coords": coords, "point_labels": labels},
                                            high_res_features=official_features["backbone_fpn"][:2], multimask_output=True)
    finally:
        with torch.no_grad():
            for bias in biases:
                bias += 5.0
    assert a.object_score_logits.item() < 0 and b[6].item() < 0
    assert (a.low_res_multimasks == -1024.0).all()
    assert torch.allclose(a.obj_ptr, ours.no_obj_ptr)
    for name, ours_value, official_value in zip(a._fields, a, b):
        assert (ours_value - official_value).abs().max().item() <= 1e-3, name


def test_stability_fallback_matches_official(tiny_pair):
    """Single-mask output: the single-mask token's mask where stable, the best multimask one where not."""
    ours, official = tiny_pair[0].sam_mask_decoder, tiny_pair[1].sam_mask_decoder
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 4, 32, 32, generator=generator) * 4
    logits[:3, 0] = torch.where(logits[:3, 0] > 0, 9.0, -9.0)  # far from 0: stable
    logits[3:, 0] *= 0.02  # mostly within +-0.05: unstable
    iou = torch.rand(6, 4, generator=generator)
    masks, scores = ours.stable_single_mask(logits, iou)
    official_masks, official_scores = official._dynamic_multimask_via_stability(logits, iou)
    assert masks.equal(official_masks) and scores.equal(official_scores)
    took_single = [masks[i, 0].equal(logits[i, 0]) for i in range(6)]
    assert took_single[:3] == [True] * 3 and not any(took_single[3:])


def test_mask_as_output_matches_official(tiny_pair):
    ours, official, ours_features, official_features = tiny_pair
    mask = torch.zeros(2, 1, 1024, 1024)
    mask[0, :, 300:700, 200:640] = 1.0  # the second object is absent (an empty mask)
    with torch.no_grad():
        a = ours.use_mask_as_output(ours_features["backbone_fpn"][2].expand(2, -1, -1, -1),
                                    [f.expand(2, -1, -1, -1) for f in ours_features["backbone_fpn"][:2]], mask)
        b = official._use_mask_as_output(official_features["backbone_fpn"][2].expand(2, -1, -1, -1),
                                         [f.expand(2, -1, -1, -1) for f in official_features["backbone_fpn"][:2]], mask)
    for name, ours_value, official_value in zip(a._fields, a, b):
        assert (ours_value - official_value).abs().max().item() <= 1e-4, name
    assert a.object_score_logits.flatten().tolist() == [10.0, -10.0]


def test_frames_reach_the_encoder_as_meta_loads_them(official_sam2, tmp_path):
    if not (CAR_SHADOW / "00000.jpg").is_file():
        pytest.skip(f"shared data not found at {CAR_SHADOW}")
    from sam2.utils.misc import load_video_frames

    for name in ("00000.jpg", "00001.jpg"):
        shutil.copy(CAR_SHADOW / name, tmp_path / name)
    frames, height, width = load_video_frames(str(tmp_path), 1024, offload_video_to_cpu=True,
                                              compute_device=torch.device("cpu"))
    assert (height, width) == (480, 854)
    for index, name in enumerate(("00000.jpg", "00001.jpg")):
        ours = frame_to_input(np.array(Image.open(tmp_path / name).convert("RGB")))
        assert ours.dtype == torch.float32 and ours.equal(frames[index]), name
    # at another square size too (the loader's resize is not tied to 1024)
    small, _, _ = load_video_frames(str(tmp_path), 256, offload_video_to_cpu=True, compute_device=torch.device("cpu"))
    assert frame_to_input(Image.open(tmp_path / "00001.jpg"), 256).equal(small[1])


def test_mask_and_points_reach_the_model_as_meta_puts_them():
    mask = np.zeros((480, 854), dtype=bool)
    mask[100:300, 200:700] = True
    model_mask = mask_to_input(mask)
    expected = torch.nn.functional.interpolate(torch.tensor(mask)[None, None].float(), size=(1024, 1024),
                                               align_corners=False, mode="bilinear", antialias=True) >= 0.5
    assert model_mask.shape == (1, 1, 1024, 1024) and model_mask.equal(expected.float())
    assert 0.2 < model_mask.mean().item() < 0.3  # (200 / 480) x (500 / 854) of the square
    assert mask_to_input(np.ones((1024, 1024))).equal(torch.ones(1, 1, 1024, 1024))
    points = points_to_input(np.array([[427.0, 240.0], [854.0, 0.0]]), (480, 854))
    assert torch.allclose(points, torch.tensor([[512.0, 512.0], [1024.0, 0.0]]))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    state = random_sam2_state("sam2.1_hiera_t", seed=7)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state}, path)
    return path, state


def test_load_sam2_reads_meta_layout(tiny_checkpoint):
    path, state = tiny_checkpoint
    model = load_sam2("sam2.1_hiera_t", path)
    assert not model.training
    loaded = model.state_dict()
    assert all(loaded[key].equal(value) for key, value in state.items())
    # the loaded model computes (built without storage, the checkpoint's tensors taken in): same features
    small = load_sam2("sam2.1_hiera_t", path, image_size=128)
    reference, _ = random_sam2("sam2.1_hiera_t", seed=7, image_size=128)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert small.forward_image(image)["vision_features"].equal(reference.forward_image(image)["vision_features"])


def test_load_sam2_names_the_variant_a_file_holds(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError) as error:
        load_sam2("sam2.1_hiera_s", path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "a sam2.1_hiera_t checkpoint" in message


def test_load_sam2_refuses_other_files(tiny_checkpoint, tmp_path):
    path, state = tiny_checkpoint
    sam2_0 = {key: value for key, value in state.items() if key not in ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight",
                                                                         "obj_ptr_tpos_proj.bias")}
    torch.save({"model": sam2_0}, tmp_path / "sam2_hiera_tiny.pt")
    with pytest.raises(CheckpointError, match="SAM 2.0 checkpoint"):
        load_sam2("sam2.1_hiera_t", tmp_path / "sam2_hiera_tiny.pt")
    sam1 = write_random_checkpoint(tmp_path / "mobile_sam.pt")
    with pytest.raises(CheckpointError, match=r"SAM \(v1\) checkpoint, not SAM 2.1"):
        load_sam2("sam2.1_hiera_t", sam1)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_sam2("sam2.1_hiera_t", tmp_path / "missing.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_sam2("sam2.1_hiera_t", tmp_path / "truncated.pt")
    with pytest.raises(ValueError, match="unknown SAM 2.1 model 'sam2.1_hiera_x'"):
        load_sam2("sam2.1_hiera_x", path)
