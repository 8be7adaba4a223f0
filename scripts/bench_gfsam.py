"""GF-SAM per image: ours (persam.method.gfsam) against the official code (ANDYZAQ/GF-SAM,
matcher/GFSAM.py, run unchanged) on the same weights and inputs, in one process, on the CPU.

    python3 scripts/bench_gfsam.py                              # vit_b + ViT-S/14, then vit_t + ViT-S/14
    python3 scripts/bench_gfsam.py --models vit_b --images 5 --threads 4
    python3 scripts/bench_gfsam.py --side 256 --images 1 --max-points 16 --sam-depth 2   # a quick check only

Each image's time is split into DINOv2 (patch features), the SAM image encoder, the decoder calls
(one mask per prompt point) and the rest (priors, points, the point-mask graph, mask growth, point
consistency, the selection and the final masks).  The official loop (main_eval.py) sets the
references again for every target, so its DINOv2 time holds the references' features too; ours
learns them once (`learn`, printed apart), as `persam apply` does.  Ratios are official / ours.

Weights are seeded random ones loaded into both (`--sam-depth` shortens SAM's ViT for a quick
check; 0 keeps the model's own).  vit_t: the official repository vendors SAM's ViT only, so its
"official" side runs GF-SAM's code with our TinyViT encoder module in its SAM (the encoder
time is then the same code on both sides; the decoder, DINOv2 and graph are the official code's).
Photos: PerSeg's cat, resized to --side squares as the official loaders resize them.  The machine
(lscpu) and torch's thread count are printed first.  Run it alone on the machine: timings of a
shared machine say little.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PARTS = ("dinov2", "sam_encoder", "decoder", "rest")


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu: not available"
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "Flags")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in keep]
    return "\n".join(line if not line.startswith("Flags") else
                     "Flags (matmul): " + " ".join(f for f in line.split()[1:] if f.startswith(("avx512", "amx", "avx2")))
                     for line in lines)


class Parts:
    """Seconds per part of one image, filled by timed wrappers."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return wrapper


def photos(side: int, count: int):
    from PIL import Image

    from persam.data.io import load_mask
    from conftest import PERSEG

    def square(index: int):
        image = Image.open(PERSEG / "Images" / "cat" / f"{index:02d}.jpg").convert("RGB")
        return np.array(image.resize((side, side), Image.Resampling.BILINEAR))

    mask = Image.fromarray(load_mask(PERSEG / "Annotations" / "cat" / "00.png"))
    reference = (square(0), np.array(mask.resize((side, side), Image.Resampling.NEAREST)) > 0)
    available = sorted(int(p.stem) for p in (PERSEG / "Images" / "cat").glob("*.jpg") if p.stem != "00")
    return reference, [square(i) for i in (available * count)[:count]]


def sam_models(model_type: str, side: int, depth: int, seed: int = 1):
    """(our SAM, its state) with seeded random weights; `depth` > 0 shortens a ViT encoder."""
    import sam.build as build
    import sam_testing

    if depth and model_type != "vit_t":
        config = build.VIT_CONFIGS[model_type]
        short = build.ViTConfig(config.embed_dim, depth, config.num_heads, tuple(i for i in config.global_attn_indexes
                                                                                  if i < depth) or (depth - 1,))
        build.VIT_CONFIGS[model_type] = sam_testing.VIT_CONFIGS[model_type] = short
    return sam_testing.random_sam(model_type, img_size=side, seed=seed)


def official_sam(segment_anything, model_type: str, ours, state: dict, side: int):
    """The fork's SAM holding the same weights; for vit_t, with our TinyViT as its image encoder."""
    import sam_testing

    if model_type != "vit_t":
        return sam_testing.official_sam_model(segment_anything, model_type, state, img_size=side)
    with torch.device("meta"):
        model = sam_testing._official_structure(segment_anything, "vit_b", side)
    model.image_encoder = torch.nn.Identity()
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("image_encoder.")}, strict=True)
    model.pixel_mean.copy_(torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1))
    model.pixel_std.copy_(torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1))
    model.image_encoder = copy.deepcopy(ours.image_encoder)
    return model.eval()


def build_pair(official_root: Path, model_type: str, dinov2_variant: str, args):
    from gfsam_testing import official_modules

    from persam.method.gfsam import GFSAM, GFSAMSettings
    from sam.dinov2 import build_dinov2
    from sam.predictor import SamPredictor
    from sam_testing import random_state_dict

    dinov2 = build_dinov2(dinov2_variant)
    dinov2_state = random_state_dict(dinov2, seed=0, std=0.05)
    dinov2.load_state_dict(dinov2_state)
    sam_model, sam_state = sam_models(model_type, args.side, args.sam_depth)
    ours = GFSAM(SamPredictor(sam_model, backend=args.backend), dinov2, GFSAMSettings(max_points=args.max_points))
    with official_modules(official_root) as official:
        theirs_sam = official_sam(official.segment_anything, model_type, sam_model, sam_state, args.side)
        builders = {"vits14": official.vits.vit_small, "vitb14": official.vits.vit_base,
                    "vitl14": official.vits.vit_large, "vitg14": official.vits.vit_giant2}
        extra = {"ffn_layer": "swiglufused"} if dinov2_variant == "vitg14" else {"ffn_layer": "mlp"}
        theirs_dinov2 = builders[dinov2_variant](patch_size=14, img_size=518, init_values=1e-5, block_chunks=0,
                                                 qkv_bias=True, proj_bias=True, ffn_bias=True, **extra)
        theirs_dinov2.load_state_dict(dinov2_state, strict=True)
        theirs = official.gfsam.GFSAM(encoder=theirs_dinov2.eval(),
                                      generator=official.segment_anything.SamPredictor(theirs_sam),
                                      input_size=args.side, device=torch.device("cpu"))
    return ours, theirs


def run_ours(ours, concept, target, parts: Parts):
    import persam.method.gfsam as ours_module

    originals = (ours_module.token_features, ours_module.point_masks, ours.predictor.set_torch_image)
    ours_module.token_features = parts.timed("dinov2", originals[0])
    ours_module.point_masks = parts.timed("decoder", originals[1])
    ours.predictor.set_torch_image = parts.timed("sam_encoder", originals[2])
    try:
        return ours.segment(target, concept)
    finally:
        ours_module.token_features, ours_module.point_masks = originals[:2]
        del ours.predictor.set_torch_image


def run_official(theirs, reference, target, parts: Parts):
    """One episode as main_eval.py runs it; the model's steps timed through instance attributes."""
    for name, method in (("sam_encoder", "extract_sam_feats"), ("dinov2", "extract_img_feats"),
                         ("decoder", "generate_sam_masks")):
        setattr(theirs, method, parts.timed(name, getattr(type(theirs), method).__get__(theirs)))
    image, mask = reference
    theirs.set_reference(torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None, None],
                         torch.from_numpy(mask).float()[None, None])
    theirs.set_target(torch.from_numpy(target).permute(2, 0, 1).float().div(255)[None])
    with torch.no_grad():
        prediction, _ = theirs.predict()
    theirs.clear()
    return prediction


def bench(official_root: Path, model_type: str, dinov2_variant: str, args) -> List[Dict[str, Dict[str, float]]]:
    if model_type == "vit_t" and args.side != 1024:  # TinyViT is built for 1024 x 1024 only
        print(f"note: vit_t runs at side 1024, not {args.side}")
        args = argparse.Namespace(**{**vars(args), "side": 1024})
    if args.max_points != 128:  # the official find_points takes at most 128; ours follows --max-points
        print(f"note: --max-points {args.max_points}: the official code keeps its 128 (its points differ)")
    ours, theirs = build_pair(official_root, model_type, dinov2_variant, args)
    reference, targets = photos(args.side, args.images + 1)
    start = time.perf_counter()
    concept = ours.learn(*reference)
    learn_s = time.perf_counter() - start
    rows = []
    for k, target in enumerate(targets):
        timings = {}
        for who, run in (("ours", lambda p: run_ours(ours, concept, target, p)),
                         ("official", lambda p: run_official(theirs, reference, target, p))):
            parts = Parts()
            start = time.perf_counter()
            run(parts)
            total = time.perf_counter() - start
            parts.seconds["rest"] = total - sum(parts.seconds[p] for p in PARTS[:3])
            timings[who] = {**{p: parts.seconds[p] for p in PARTS}, "total": total}
        if k > 0 or args.images == 0:  # the first image warms both up
            rows.append(timings)
    print(f"\n{model_type} + DINOv2 {dinov2_variant}, side {args.side}, max points {args.max_points}, "
          f"our backend {args.backend}: ours learned the reference in {learn_s:.2f} s (once)")
    print(f"{'image':>5}  " + "  ".join(f"{p + ' ours/official':>26}" for p in (*PARTS, "total")))
    for k, row in enumerate(rows, start=1):
        print(f"{k:>5}  " + "  ".join(f"{row['ours'][p]:>11.3f} s /{row['official'][p]:>9.3f} s"
                                      for p in (*PARTS, "total")))
    if rows:
        means = {who: {p: float(np.mean([r[who][p] for r in rows])) for p in (*PARTS, "total")}
                 for who in ("ours", "official")}
        print(f"{'mean':>5}  " + "  ".join(f"{means['ours'][p]:>11.3f} s /{means['official'][p]:>9.3f} s"
                                         for p in (*PARTS, "total")))
        print("ratio official / ours: " + ", ".join(
            f"{p} {means['official'][p] / max(means['ours'][p], 1e-9):.2f}x" for p in (*PARTS, "total")))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_b,vit_t", help="SAM models, comma-separated (default vit_b,vit_t)")
    parser.add_argument("--dinov2", default="vits14", help="DINOv2 variant (default vits14)")
    parser.add_argument("--images", type=int, default=3,
                        help="timed images after one warm-up (default 3; 0: the warm-up alone, timed)")
    parser.add_argument("--side", type=int, default=1024, help="square input side (default 1024, the official)")
    parser.add_argument("--max-points", type=int, default=128, help="our prompt points (default 128, the official)")
    parser.add_argument("--sam-depth", type=int, default=0, help="shorten SAM's ViT to N blocks (0: its own)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--backend", default="torch", help="our encoder backend (default torch, as the official)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    importlib.import_module("torch._dynamo")  # before the stubbed torchvision, which its import scans

    from gfsam_testing import extract_official

    with tempfile.TemporaryDirectory(prefix="gfsam-official-") as folder:
        try:
            root = extract_official(Path(folder))
        except (FileNotFoundError, subprocess.CalledProcessError) as exc:
            print(f"the official GF-SAM code is not available: {exc}", file=sys.stderr)
            return 2
        for model_type in [m.strip() for m in args.models.split(",") if m.strip()]:
            bench(root, model_type, args.dinov2, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
