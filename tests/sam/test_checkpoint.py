"""Tests for sam.checkpoint: reading, HuggingFace key conversion, model-type guessing, load_into."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from sam.checkpoint import (
    CheckpointError,
    checkpoint_file,
    convert_hf_to_meta,
    guess_model_type,
    is_hf_state_dict,
    load_into,
    read_state_dict,
)

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
MOBILE_SAM_KEYS = REFERENCE / "mobile_sam_vit_t_keys.json"


# --------------------------------------------------------------------------------------------
# The official key layout of Meta's segment_anything Sam, written out by hand.
# (width, depth, heads, global-attention block indexes) as in segment_anything/build_sam.py
_VIT_CFG = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def meta_image_encoder_shapes(model_type):
    width, depth, heads, global_idx = _VIT_CFG[model_type]
    hd = width // heads
    s = {
        "image_encoder.pos_embed": [1, 64, 64, width],
        "image_encoder.patch_embed.proj.weight": [width, 3, 16, 16],
        "image_encoder.patch_embed.proj.bias": [width],
    }
    for i in range(depth):
        b = f"image_encoder.blocks.{i}."
        rel = 2 * 64 - 1 if i in global_idx else 2 * 14 - 1
        s.update(
            {
                b + "norm1.weight": [width],
                b + "norm1.bias": [width],
                b + "attn.rel_pos_h": [rel, hd],
                b + "attn.rel_pos_w": [rel, hd],
                b + "attn.qkv.weight": [3 * width, width],
                b + "attn.qkv.bias": [3 * width],
                b + "attn.proj.weight": [width, width],
                b + "attn.proj.bias": [width],
                b + "norm2.weight": [width],
                b + "norm2.bias": [width],
                b + "mlp.lin1.weight": [4 * width, width],
                b + "mlp.lin1.bias": [4 * width],
                b + "mlp.lin2.weight": [width, 4 * width],
                b + "mlp.lin2.bias": [width],
            }
        )
    s.update(
        {
            "image_encoder.neck.0.weight": [256, width, 1, 1],
            "image_encoder.neck.1.weight": [256],
            "image_encoder.neck.1.bias": [256],
            "image_encoder.neck.2.weight": [256, 256, 3, 3],
            "image_encoder.neck.3.weight": [256],
            "image_encoder.neck.3.bias": [256],
        }
    )
    return s


def meta_prompt_and_decoder_shapes():
    s = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": [2, 128]}
    for i in range(4):
        s[f"prompt_encoder.point_embeddings.{i}.weight"] = [1, 256]
    s["prompt_encoder.not_a_point_embed.weight"] = [1, 256]
    for idx, shape in [(0, [4, 1, 2, 2]), (1, [4]), (3, [16, 4, 2, 2]), (4, [16]), (6, [256, 16, 1, 1])]:
        s[f"prompt_encoder.mask_downscaling.{idx}.weight"] = shape
        s[f"prompt_encoder.mask_downscaling.{idx}.bias"] = [shape[0]]
    s["prompt_encoder.no_mask_embed.weight"] = [1, 256]

    def attn(prefix, internal):
        return {
            prefix + "q_proj.weight": [internal, 256],
            prefix + "q_proj.bias": [internal],
            prefix + "k_proj.weight": [internal, 256],
            prefix + "k_proj.bias": [internal],
            prefix + "v_proj.weight": [internal, 256],
            prefix + "v_proj.bias": [internal],
            prefix + "out_proj.weight": [256, internal],
            prefix + "out_proj.bias": [256],
        }

    def norm(prefix):
        return {prefix + "weight": [256], prefix + "bias": [256]}

    t = "mask_decoder.transformer."
    for i in range(2):
        L = f"{t}layers.{i}."
        s.update(attn(L + "self_attn.", 256))
        s.update(norm(L + "norm1."))
        s.update(attn(L + "cross_attn_token_to_image.", 128))
        s.update(norm(L + "norm2."))
        s.update(
            {
                L + "mlp.lin1.weight": [2048, 256],
                L + "mlp.lin1.bias": [2048],
                L + "mlp.lin2.weight": [256, 2048],
                L + "mlp.lin2.bias": [256],
            }
        )
        s.update(norm(L + "norm3."))
        s.update(norm(L + "norm4."))
        s.update(attn(L + "cross_attn_image_to_token.", 128))
    s.update(attn(t + "final_attn_token_to_image.", 128))
    s.update(norm(t + "norm_final_attn."))
    s["mask_decoder.iou_token.weight"] = [1, 256]
    s["mask_decoder.mask_tokens.weight"] = [4, 256]
    s.update(
        {
            "mask_decoder.output_upscaling.0.weight": [256, 64, 2, 2],
            "mask_decoder.output_upscaling.0.bias": [64],
            "mask_decoder.output_upscaling.1.weight": [64],
            "mask_decoder.output_upscaling.1.bias": [64],
            "mask_decoder.output_upscaling.3.weight": [64, 32, 2, 2],
            "mask_decoder.output_upscaling.3.bias": [32],
        }
    )
    for m in range(4):
        for j, (o, i) in enumerate([(256, 256), (256, 256), (32, 256)]):
            p = f"mask_decoder.output_hypernetworks_mlps.{m}.layers.{j}."
            s[p + "weight"] = [o, i]
            s[p + "bias"] = [o]
    for j, (o, i) in enumerate([(256, 256), (256, 256), (4, 256)]):
        p = f"mask_decoder.iou_prediction_head.layers.{j}."
        s[p + "weight"] = [o, i]
        s[p + "bias"] = [o]
    return s


def meta_sam_shapes(model_type):
    s = meta_image_encoder_shapes(model_type)
    s.update(meta_prompt_and_decoder_shapes())
    return s


def tagged_state_dict(keys):
    """Small tensors whose values identify their key, to check that values follow their names."""
    return {k: torch.full((2, 3), float(i)) for i, k in enumerate(keys)}


def shape_only_state_dict(shapes):
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


# --------------------------------------------------------------------------------------------
# Meta -> HF, written independently of sam.checkpoint from the table of transformers'
# convert_sam_to_hf.py: every (old, new) substring replacement is tried in this order on each
# key, then the hypernetwork MLP layers are renumbered, and the positional matrix is stored
# under both prompt_encoder.shared_embedding.* and shared_image_embedding.*.
HF_TABLE = [
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
]
_HYPER = re.compile(r".*\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.")
_HYPER_NEW = {0: ("layers.0", "proj_in"), 1: ("layers.1", "layers.0"), 2: ("layers.2", "proj_out")}


def meta_to_hf(sd, tie_positional=True):
    out = {}
    for key, value in sd.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in HF_TABLE:
            if old in key:
                key = key.replace(old, new)
        m = _HYPER.match(key)
        if m:
            old, new = _HYPER_NEW[int(m.group(2))]
            key = key.replace(old, new)
        out[key] = value
    if tie_positional:
        out["shared_image_embedding.positional_embedding"] = out[
            "prompt_encoder.shared_embedding.positional_embedding"
        ]
    return out


# --------------------------------------------------------------------------------------------
# the hand-written key layout is right


def test_prompt_and_decoder_keys_match_mobile_sam_reference():
    if not MOBILE_SAM_KEYS.is_file():
        pytest.skip(f"{MOBILE_SAM_KEYS} not available")
    ref = json.loads(MOBILE_SAM_KEYS.read_text())
    ref = {k: v for k, v in ref.items() if not k.startswith("image_encoder.")}
    assert ref == meta_prompt_and_decoder_shapes()
    assert list(ref) == list(meta_prompt_and_decoder_shapes())


def test_hand_written_layout_matches_segment_anything(official_sam):
    """official_sam: Meta's segment_anything package (fixture from conftest.py)."""
    for t in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            model = official_sam.sam_model_registry[t]()
        ref = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        assert [[k, v] for k, v in meta_sam_shapes(t).items()] == ref, t


# --------------------------------------------------------------------------------------------
# reading Meta / MobileSAM files


def test_read_plain_state_dict(tmp_path):
    sd = tagged_state_dict(meta_sam_shapes("vit_b"))
    p = tmp_path / "sam.pth"
    torch.save(sd, p)
    got = read_state_dict(p)
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert read_state_dict(str(p)).keys() == sd.keys()


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_read_wrapped_state_dict(tmp_path, wrapper):
    sd = {"image_encoder.x": torch.ones(2), "mask_decoder.y": torch.zeros(3)}
    p = tmp_path / "wrapped.pth"
    torch.save({wrapper: sd, "epoch": 3}, p)
    got = read_state_dict(p)
    assert got.keys() == sd.keys() and torch.equal(got["image_encoder.x"], sd["image_encoder.x"])


def test_read_strips_dataparallel_prefix(tmp_path):
    p = tmp_path / "dp.pth"
    torch.save({"module.image_encoder.x": torch.ones(2)}, p)
    assert list(read_state_dict(p)) == ["image_encoder.x"]


def test_mobile_sam_layout_reads_and_guesses_vit_t(tmp_path):
    if not MOBILE_SAM_KEYS.is_file():
        pytest.skip(f"{MOBILE_SAM_KEYS} not available")
    keys = json.loads(MOBILE_SAM_KEYS.read_text())
    sd = tagged_state_dict(keys)
    p = tmp_path / "mobile_sam.pt"
    torch.save(sd, p)
    got = read_state_dict(p)
    assert list(got) == list(keys)  # not mistaken for a HuggingFace file
    assert guess_model_type(shape_only_state_dict(keys)) == "vit_t"


# --------------------------------------------------------------------------------------------
# errors


def _assert_corrupt_message(exc_info, path, model="MODEL"):
    # a file outside the download cache is the user's: never told to delete it
    msg = str(exc_info.value)
    assert f"{path} is not a readable checkpoint (truncated or corrupt?): " in msg
    assert "delete" not in msg
    assert f"or get one with `persam download {model}`" in msg
    assert "\n" not in msg
    assert "Traceback" not in msg


def test_truncated_pth(tmp_path):
    p = tmp_path / "sam.pth"
    torch.save(tagged_state_dict(meta_prompt_and_decoder_shapes()), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p)
    _assert_corrupt_message(ei, p)


def test_truncated_official_name_suggests_its_model(tmp_path):
    p = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"a": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p)
    _assert_corrupt_message(ei, p, "vit_b")


def test_model_type_hint_used_in_message(tmp_path):
    p = tmp_path / "weights.pth"
    p.write_text("hello")
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p, model_type="vit_h")
    _assert_corrupt_message(ei, p, "vit_h")


@pytest.mark.parametrize(
    "name,content",
    [
        ("text.pth", b"<html><body>404 Not Found</body></html>\n"),
        ("random.pth", os.urandom(4096)),
        ("empty.pth", b""),
        ("truncated.safetensors", None),
    ],
)
def test_non_checkpoint_files(tmp_path, name, content):
    p = tmp_path / name
    if content is None:
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(100, 100)}, str(p))
        content = p.read_bytes()[:200]
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p)
    _assert_corrupt_message(ei, p)


def test_zip_that_is_not_a_torch_archive(tmp_path):
    p = tmp_path / "archive.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
        z.writestr("dir/data.bin", b"\x00" * 100)
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p)
    _assert_corrupt_message(ei, p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CheckpointError, match=re.escape(str(p))):
        read_state_dict(p)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_file(tmp_path)


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), p)
    with pytest.raises(CheckpointError, match="does not contain a state dict"):
        read_state_dict(p)
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, p)
    with pytest.raises(CheckpointError, match="not named tensors"):
        read_state_dict(p)


def test_pickled_objects_refused_without_running_them(tmp_path):
    import argparse

    p = tmp_path / "train.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, p)
    with pytest.raises(CheckpointError, match=r"was refused: it holds code .*argparse\.Namespace"):
        read_state_dict(p)


class _Malicious:
    """Unpickling this would create a folder: the file holds code, not weights."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-4", "pickle-0"])
def test_malicious_pickle_refused_as_code(tmp_path, writer):
    """A checkpoint that would run code when unpickled is refused, in one line that says so and names
    what it calls (not "truncated or corrupt?" with a cut-off torch message), and nothing runs."""
    import pickle

    marker = tmp_path / "code-ran"
    payload = {"image_encoder.x": torch.zeros(2), "evil": _Malicious(marker)}
    p = tmp_path / "mobile_sam.pt"
    if writer == "torch.save":
        torch.save(payload, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer.split("-")[1]))
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p} was refused: it holds code that would run when it is loaded")
    assert f"{os.mkdir.__module__}.mkdir" in msg and "not only weights" in msg
    assert "truncated or corrupt" not in msg and "weights_only" not in msg and "..." not in msg
    assert "\n" not in msg
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# HuggingFace format


def test_hf_forward_mapping_sanity():
    """A few well-known HF names, to make sure the test's forward mapping is the real one."""
    hf = meta_to_hf(tagged_state_dict(meta_sam_shapes("vit_b")))
    for k in [
        "vision_encoder.patch_embed.projection.weight",
        "vision_encoder.layers.0.layer_norm1.weight",
        "vision_encoder.layers.11.attn.qkv.weight",
        "vision_encoder.layers.3.mlp.lin2.bias",
        "vision_encoder.neck.conv1.weight",
        "vision_encoder.neck.layer_norm2.bias",
        "shared_image_embedding.positional_embedding",
        "prompt_encoder.shared_embedding.positional_embedding",
        "prompt_encoder.point_embed.3.weight",
        "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.no_mask_embed.weight",
        "prompt_encoder.mask_embed.conv1.weight",
        "prompt_encoder.mask_embed.layer_norm2.bias",
        "prompt_encoder.mask_embed.conv3.weight",
        "mask_decoder.transformer.layers.1.layer_norm4.weight",
        "mask_decoder.transformer.layer_norm_final_attn.bias",
        "mask_decoder.upscale_conv1.weight",
        "mask_decoder.upscale_layer_norm.weight",
        "mask_decoder.upscale_conv2.bias",
        "mask_decoder.output_hypernetworks_mlps.2.proj_in.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",
        "mask_decoder.iou_prediction_head.proj_in.weight",
        "mask_decoder.iou_prediction_head.layers.0.bias",
        "mask_decoder.iou_prediction_head.proj_out.weight",
    ]:
        assert k in hf, k
    assert not any(k.startswith("image_encoder.") or ".blocks." in k for k in hf)
    assert len(hf) == len(meta_sam_shapes("vit_b")) + 1


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_hf_to_meta_round_trip_all_keys(model_type):
    meta = tagged_state_dict(meta_sam_shapes(model_type))
    hf = meta_to_hf(meta)
    assert is_hf_state_dict(hf) and not is_hf_state_dict(meta)
    back = convert_hf_to_meta(hf)
    assert sorted(back) == sorted(meta)
    for k in meta:
        assert torch.equal(back[k], meta[k]), k


_HF_POS = [
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
]


@pytest.mark.parametrize("keep", _HF_POS)
def test_hf_either_positional_key_is_enough(keep):
    meta = tagged_state_dict(meta_sam_shapes("vit_b"))
    hf = meta_to_hf(meta)
    for k in _HF_POS:
        if k != keep:
            del hf[k]
    back = convert_hf_to_meta(hf)
    assert sorted(back) == sorted(meta)
    pos = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    assert torch.equal(back[pos], meta[pos])


@pytest.mark.parametrize("layout", ["safetensors", "bin", "dir_safetensors", "dir_bin"])
def test_read_hf_files(tmp_path, layout):
    from safetensors.torch import save_file

    meta = tagged_state_dict(meta_sam_shapes("vit_b"))
    # safetensors refuses tensors that share memory: store the tied copy separately, as
    # transformers' save_pretrained does after untying
    hf = {k: v.clone() for k, v in meta_to_hf(meta).items()}
    folder = tmp_path / "facebook-sam-vit-base"
    folder.mkdir()
    if layout.endswith("safetensors"):
        f = folder / "model.safetensors"
        save_file(hf, str(f), metadata={"format": "pt"})
    else:
        f = folder / "pytorch_model.bin"
        torch.save(hf, f)
    got = read_state_dict(folder if layout.startswith("dir") else f)
    assert sorted(got) == sorted(meta)
    for k in meta:
        assert torch.equal(got[k], meta[k]), k
    assert checkpoint_file(folder if layout.startswith("dir") else f) == f


def test_checkpoint_folder_resolves_to_its_weights_file(tmp_path):
    """`--checkpoint FOLDER` (persam.runs.models.resolve_checkpoint): the weights file inside a HuggingFace
    folder, whose sha256 the run's key and the concept record (a folder has none: [Errno 21] before)."""
    from safetensors.torch import save_file

    from persam.errors import InputError
    from persam.runs.models import resolve_checkpoint
    from persam.runs.key import file_sha256

    hf = {k: v.clone() for k, v in meta_to_hf(tagged_state_dict(meta_sam_shapes("vit_b"))).items()}
    folder = tmp_path / "facebook-sam-vit-base"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    got = resolve_checkpoint("vit_b", folder)
    assert got == folder / "model.safetensors"
    assert len(file_sha256(got)) == 64
    assert sorted(read_state_dict(got)) == sorted(meta_sam_shapes("vit_b"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{re.escape(str(empty))} is a directory without a checkpoint"):
        resolve_checkpoint("vit_b", empty)


def test_cli_learns_from_a_checkpoint_folder(tmp_path, random_vit_t_checkpoint, perseg_dir, capsys):
    """README: checkpoints load from a folder holding model.safetensors; `persam learn --checkpoint
    FOLDER` failed with "[Errno 21] Is a directory" when it took the folder's sha256."""
    from safetensors.torch import save_file

    from cli_testing import ref_args, run_cli, write_cat_photos
    from persam.data.concept import load_concept
    from persam.runs.key import file_sha256

    folder = tmp_path / "mobile-sam"
    folder.mkdir()
    weights = folder / "model.safetensors"
    save_file(read_state_dict(random_vit_t_checkpoint), str(weights))
    data = tmp_path / "data"
    data.mkdir()
    write_cat_photos(perseg_dir, data, 256)
    concept = tmp_path / "cat.pt"
    code = run_cli(["learn", *ref_args(data), "--out", concept, "--model", "vit_t", "--checkpoint", folder, "-q"])
    assert code == 0, capsys.readouterr().err
    assert "Errno" not in capsys.readouterr().err
    load_concept(concept, model_type="vit_t", checkpoint_sha256=file_sha256(weights))  # recorded: the file's


def test_hf_misspelled_upscale_norm_accepted():
    meta = tagged_state_dict(meta_sam_shapes("vit_b"))
    hf = meta_to_hf(meta)
    for s in ("weight", "bias"):
        hf[f"mask_decoder.upsacle_layer_norm.{s}"] = hf.pop(f"mask_decoder.upscale_layer_norm.{s}")
    assert sorted(convert_hf_to_meta(hf)) == sorted(meta)


# --------------------------------------------------------------------------------------------
# guess_model_type


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_guess_vit(model_type):
    shapes = meta_sam_shapes(model_type)
    sd = shape_only_state_dict(shapes)
    assert guess_model_type(sd) == model_type
    assert guess_model_type(meta_to_hf(sd)) == model_type  # HF naming too


def test_guess_vit_t_from_tinyvit_keys():
    sd = shape_only_state_dict(
        {
            "image_encoder.patch_embed.seq.0.c.weight": [32, 3, 3, 3],
            "image_encoder.layers.0.blocks.0.conv1.c.weight": [256, 64, 1, 1],
            **meta_prompt_and_decoder_shapes(),
        }
    )
    assert guess_model_type(sd) == "vit_t"


def test_guess_unknown():
    assert guess_model_type({}) is None
    assert guess_model_type({"foo.weight": torch.zeros(2)}) is None
    sd = shape_only_state_dict(meta_sam_shapes("vit_b"))
    del sd["image_encoder.blocks.11.norm1.weight"]  # still 12 blocks: other keys remain
    assert guess_model_type(sd) == "vit_b"
    sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.blocks.11.")}
    assert guess_model_type(sd) is None  # width of vit_b, only 11 blocks
    sd = shape_only_state_dict(meta_sam_shapes("vit_b"))
    sd["image_encoder.patch_embed.proj.weight"] = torch.empty(384, 3, 16, 16, device="meta")
    assert guess_model_type(sd) is None


# --------------------------------------------------------------------------------------------
# load_into with a small stand-in model (independent of sam.build)


class _Tiny(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.image_encoder = torch.nn.Linear(width, width)
        self.mask_decoder = torch.nn.Linear(width, 2)


def test_load_into_small_model(tmp_path):
    src = _Tiny()
    p = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), p)
    dst = _Tiny()
    load_into(dst, p, "vit_b")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_load_into_reports_missing_unexpected_mismatched(tmp_path):
    sd = _Tiny().state_dict()
    del sd["mask_decoder.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["image_encoder.weight"] = torch.zeros(5, 5)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as ei:
        load_into(_Tiny(), p, "vit_b")
    msg = str(ei.value)
    assert str(p) in msg and "'vit_b'" in msg
    assert "1 missing key: mask_decoder.bias" in msg
    assert "1 unexpected key: extra.weight" in msg
    assert "1 key with mismatched shapes: image_encoder.weight (checkpoint [5, 5], model [4, 4])" in msg


def test_load_into_lists_first_five_and_names_fitting_type(tmp_path):
    sd = {k: torch.zeros(1) for k in meta_prompt_and_decoder_shapes()}
    sd["image_encoder.layers.0.blocks.0.conv1.c.weight"] = torch.zeros(1)  # TinyViT layout
    p = tmp_path / "mobile_sam.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as ei:
        load_into(_Tiny(), p, "vit_h")
    msg = str(ei.value)
    assert f"{len(sd)} unexpected keys: " in msg
    assert msg.count("prompt_encoder.") == 5  # only the first five are listed
    assert "this checkpoint fits model type 'vit_t'" in msg
    assert "4 missing keys" in msg


def test_load_into_pixel_buffers_tolerated(tmp_path):
    class WithPixel(_Tiny):
        def __init__(self):
            super().__init__()
            self.register_buffer("pixel_mean", torch.tensor([1.0, 2.0, 3.0]))

    p = tmp_path / "official_like.pth"
    torch.save(_Tiny().state_dict(), p)  # official files have no pixel_mean
    m = WithPixel()
    load_into(m, p, "vit_b")
    assert torch.equal(m.pixel_mean, torch.tensor([1.0, 2.0, 3.0]))
    sd = WithPixel().state_dict()
    torch.save(sd, p)
    load_into(_Tiny(), p, "vit_b")  # and the reverse


def test_load_into_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_into(_Tiny(), tmp_path / "x.pth", "vit_b")


# --------------------------------------------------------------------------------------------
# load_into with the real models from sam.build (skipped until it exists)


@pytest.fixture(scope="module")
def build():
    return pytest.importorskip("sam.build")


def _build_or_skip(build, model_type):
    try:
        return build.build_sam_model(model_type)
    except (KeyError, ValueError, NotImplementedError) as exc:
        pytest.skip(f"build_sam_model({model_type!r}) not available: {exc}")


@pytest.fixture(scope="module")
def vit_b_model(build):
    return _build_or_skip(build, "vit_b")


def test_real_vit_b_layout_is_official(vit_b_model):
    model = vit_b_model
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    got.pop("pixel_mean", None)
    got.pop("pixel_std", None)
    assert got == meta_sam_shapes("vit_b")


def test_real_vit_t_layout_is_official(build):
    if not MOBILE_SAM_KEYS.is_file():
        pytest.skip(f"{MOBILE_SAM_KEYS} not available")
    model = _build_or_skip(build, "vit_t")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    got.pop("pixel_mean", None)
    got.pop("pixel_std", None)
    assert got == json.loads(MOBILE_SAM_KEYS.read_text())


@pytest.fixture(scope="module")
def vit_t_model(build):
    return _build_or_skip(build, "vit_t")


def test_load_into_real_vit_t_round_trip(vit_t_model, tmp_path):
    model = vit_t_model
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p = tmp_path / "mobile_sam.pt"
    torch.save(sd, p)
    with torch.no_grad():
        for q in model.parameters():
            q.zero_()
    load_into(model, p, "vit_t")
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_load_into_real_vit_b_from_hf_and_wrong_type(vit_b_model, vit_t_model, tmp_path):
    from safetensors.torch import save_file

    model = vit_b_model
    # a snapshot, not views of the parameters (those are zeroed below)
    sd = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k not in ("pixel_mean", "pixel_std")
    }
    # a HF-named copy of the model's own weights loads back exactly
    hf = meta_to_hf(sd)
    tied = "shared_image_embedding.positional_embedding"
    hf[tied] = hf[tied].clone()  # safetensors refuses tensors that share memory
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(hf, str(hf_dir / "model.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, b in model.named_buffers():
            if name in sd:  # e.g. the prompt encoder's positional matrix
                b.zero_()
    load_into(model, hf_dir, "vit_b")
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert sd["image_encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0

    # the vit_b checkpoint does not fit a vit_t model: one message that says what it is
    with pytest.raises(CheckpointError) as ei:
        load_into(vit_t_model, hf_dir, "vit_t")
    msg = str(ei.value)
    assert "'vit_t'" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "this checkpoint fits model type 'vit_b'" in msg


def test_build_sam_with_truncated_checkpoint(build, tmp_path):
    p = tmp_path / "mobile_sam.pt"
    torch.save({"a": torch.zeros(10000)}, p)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        build.build_sam("vit_t", checkpoint=p)
