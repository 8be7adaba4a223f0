#!/usr/bin/env python
"""Frames/s and peak memory of `persam track --tracker sam2` against Meta's SAM2VideoPredictor, same weights
and frames, in one run.

    python scripts/bench_track.py [--frames-dir DIR] [--count 40] [--variants sam2.1_hiera_t,sam2.1_hiera_s]
                                  [--input-size 1024] [--threads N] [--checkpoint-dir DIR] [--device cpu]

For each variant, two child processes (so that each one's peak resident memory is its own):

* ours: ``persam track FRAMES --tracker sam2 --ref-mask FIRST --fill-holes 0`` in-process (persam.cli),
  frames/s as results.json's ``this_run`` counts it (reading, encoding, tracking and writing the masks and the
  overlay video; building the model not counted);
* Meta's: ``init_state`` on the folder (it decodes every frame first), ``add_new_mask`` on frame 0 and
  ``propagate_in_video`` (frames/s over all three; building the model not counted).  Needs Meta's ``sam2``
  package (``pip install --no-deps sam2==1.1.0 hydra-core iopath``); torchvision is stubbed as in the tests.
  ``--meta-precision bf16`` runs it under ``torch.autocast(bfloat16)``, as Meta's README runs its predictor.

Weights: Meta's checkpoints from --checkpoint-dir (``sam2.1_hiera_tiny.pt`` ...) when given, else seeded random
weights written once to a temporary checkpoint both sides load.  The frames default to the shared car-shadow
sequence and its first annotation (object 1).  Prints the CPU (lscpu), one line per side and variant, and the
ratio of frames/s (ours / Meta's) and of peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DAVIS = ROOT.parent / "shared" / "data" / "davis2017"
CHECKPOINT_FILES = {"sam2.1_hiera_t": "sam2.1_hiera_tiny.pt", "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
                    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_l": "sam2.1_hiera_large.pt"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return f"{names[0] if names else 'unknown'}, {os.cpu_count()} logical CPUs"


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# the two sides, each in its own process


def run_ours(args) -> dict:
    from persam.cli import commands

    out = Path(args.work) / f"ours_{args.variant}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["track", args.frames, "--tracker", "sam2", "--model", args.variant, "--checkpoint", args.checkpoint,
            "--ref-mask", args.mask, "--out", str(out), "--fill-holes", "0", "--redetect-after", "0",
            "--input-size", str(args.input_size), "--device", args.device, "--backend", args.ours_backend,
            "--precision", args.ours_precision, "-q"]
    code = commands.main(argv)
    if code != 0:
        raise SystemExit(f"persam track exited with {code}")
    run = json.loads((out / "results.json").read_text())["summary"]["this_run"]
    return {"frames": run["frames"], "seconds": run["seconds"], "fps": run["frames_per_second"], "peak_mb": peak_mb()}


def run_meta(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from sam2_testing import official_sam2_model  # Meta's predictor, torchvision stubbed

    from sam.checkpoint import read_state_dict

    state = read_state_dict(Path(args.checkpoint), model_type=args.variant)
    predictor = official_sam2_model(args.variant, state, video=True, image_size=args.input_size)
    predictor = predictor.to(args.device)
    predictor.fill_hole_area = 0
    mask = np.array(Image.open(args.mask)) > 0
    frames = 0
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.meta_precision == "bf16")
    with torch.inference_mode(), autocast:
        start = time.perf_counter()
        inference = predictor.init_state(args.frames, offload_video_to_cpu=args.device == "cpu")
        predictor.add_new_mask(inference, frame_idx=0, obj_id=1, mask=mask)
        for _ in predictor.propagate_in_video(inference):
            frames += 1
        seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": round(seconds, 3), "fps": round(frames / seconds, 4), "peak_mb": peak_mb()}


# ---------------------------------------------------------------------------------------------
# the parent


def prepare(args, work: Path) -> tuple:
    """The frame folder, the first-frame mask (0/255) and a checkpoint per variant."""
    import numpy as np
    import torch
    from PIL import Image

    source = Path(args.frames_dir)
    annotation = Path(args.first_mask)
    if not source.is_dir() or not annotation.is_file():
        raise SystemExit(f"frames {source} or first mask {annotation} not found")
    frames = work / "frames"
    frames.mkdir()
    for path in sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.count]:
        shutil.copy(path, frames / path.name)
    mask = np.array(Image.open(annotation)) == 1
    Image.fromarray(mask.astype(np.uint8) * 255).save(work / "first.png")
    checkpoints = {}
    for variant in args.variants.split(","):
        if args.checkpoint_dir:
            checkpoints[variant] = Path(args.checkpoint_dir) / CHECKPOINT_FILES[variant]
            continue
        sys.path.insert(0, str(ROOT / "tests"))
        from sam2_testing import random_sam2_state

        checkpoints[variant] = work / f"{variant}_random.pt"
        torch.save({"model": random_sam2_state(variant, seed=0)}, checkpoints[variant])
    return frames, work / "first.png", checkpoints


def child(side: str, variant: str, checkpoint: Path, frames: Path, mask: Path, work: Path, args) -> dict:
    command = [sys.executable, __file__, "--side", side, "--variant", variant, "--checkpoint", str(checkpoint),
               "--frames", str(frames), "--mask", str(mask), "--work", str(work), "--input-size", str(args.input_size),
               "--threads", str(args.threads), "--device", args.device, "--ours-backend", args.ours_backend,
               "--ours-precision", args.ours_precision, "--meta-precision", args.meta_precision]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-dir", default=str(SHARED_DAVIS / "JPEGImages" / "480p" / "car-shadow"))
    parser.add_argument("--first-mask", default=str(SHARED_DAVIS / "Annotations" / "480p" / "car-shadow" / "00000.png"))
    parser.add_argument("--count", type=int, default=40, help="frames (default 40)")
    parser.add_argument("--variants", default="sam2.1_hiera_t,sam2.1_hiera_s")
    parser.add_argument("--input-size", type=int, default=1024, help="the model's input side (1024 as trained)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint-dir", default=None, help="Meta's checkpoints instead of random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ours-precision", default="fp32", choices=("fp32", "bf16"),
                        help="our SAM 2.1 steps in fp32 (Meta's masks) or under bf16 autocast (faster where the CPU "
                             "has native bf16; Meta's side stays fp32, as its predictor runs on a CPU)")
    parser.add_argument("--meta-precision", default="fp32", choices=("fp32", "bf16"),
                        help="Meta's predictor in fp32 or under bf16 autocast (the way Meta's README runs it)")
    parser.add_argument("--ours-backend", default="torch", choices=("torch", "openvino", "onnxruntime"),
                        help="who runs our SAM 2 image step (sam.sam2.encoder_backends, CPU only; the export is "
                             "cached, its one-time build not counted)")
    # a child process's own arguments
    parser.add_argument("--side", choices=("ours", "meta"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--frames", help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps((run_ours if args.side == "ours" else run_meta)(args)), flush=True)
        return
    print(f"machine: {cpu_model()}; device {args.device}; torch threads {args.threads or 'default'}; "
          f"input {args.input_size}; {args.count} frames; our image step on {args.ours_backend}, "
          f"ours in {args.ours_precision}, Meta's in {args.meta_precision}")
    with tempfile.TemporaryDirectory(prefix="bench_track_") as tmp:
        work = Path(tmp)
        frames, mask, checkpoints = prepare(args, work)
        print(f"{'variant':<16} {'side':<6} {'frames':>6} {'seconds':>8} {'frames/s':>9} {'peak MB':>8}")
        for variant, checkpoint in checkpoints.items():
            results = {side: child(side, variant, checkpoint, frames, mask, work, args) for side in ("ours", "meta")}
            for side, r in results.items():
                print(f"{variant:<16} {side:<6} {r['frames']:>6} {r['seconds']:>8.2f} {r['fps']:>9.3f} "
                      f"{r['peak_mb']:>8.0f}")
            ours, meta = results["ours"], results["meta"]
            print(f"{variant:<16} ratio  frames/s ours / Meta's {ours['fps'] / meta['fps']:.2f}x; "
                  f"peak memory ours / Meta's {ours['peak_mb'] / meta['peak_mb']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
