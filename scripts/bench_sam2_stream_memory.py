#!/usr/bin/env python
"""Memory of the streaming SAM 2.1 tracker over a long synthetic video: flat, whatever the length.

    python scripts/bench_sam2_stream_memory.py [--frames 3000] [--image-size 256] [--frame-size 240x320]
                                               [--objects 1] [--every 250] [--checkpoint PATH] [--threads 1]

Frames (a random picture shifted by one pixel per frame) go one at a time through
sam.sam2.video.VideoTracker with sam2.1_hiera_t (seeded random weights, or --checkpoint), the object
given by a box-shaped mask on frame 0. Every --every frames it prints the process's resident memory
(current, from /proc/self/statm), the tensors and bytes the memory banks hold, and the seconds per frame
since the last line. Meta's predictor, by contrast, loads every frame of the video before it starts
(init_state: 3 x S x S float32 per frame).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from sam.sam2.build import build_sam2, load_sam2
from sam.sam2.video import VideoTracker


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_model(image_size: int, seed: int = 0) -> torch.nn.Module:
    """sam2.1_hiera_t with seeded random weights (norm scales around 1)."""
    model = build_sam2("sam2.1_hiera_t", image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        is_scale = key.endswith(".weight") and value.dim() == 1
        state[key] = 1.0 + 0.05 * noise if is_scale else (noise if "gaussian_matrix" in key else 0.05 * noise)
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=256, help="model input side (1024 for real use)")
    parser.add_argument("--frame-size", default="240x320", help="HxW of the synthetic frames")
    parser.add_argument("--objects", type=int, default=1)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--checkpoint", help="a sam2.1_hiera_t checkpoint instead of random weights")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.frame_size.split("x"))
    if args.checkpoint:
        model = load_sam2("sam2.1_hiera_t", args.checkpoint, image_size=args.image_size)
    else:
        model = random_model(args.image_size)
    tracker = VideoTracker(model)
    picture = np.random.default_rng(0).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    masks = {}
    for object_id in range(1, args.objects + 1):
        mask = np.zeros((height, width), dtype=bool)
        left = (object_id - 1) * width // (args.objects + 1)
        mask[height // 4: 3 * height // 4, left + width // 8: left + width // 4] = True
        masks[object_id] = mask
    print(f"{'frame':>6} {'resident MB':>12} {'peak MB':>8} {'bank tensors':>13} {'bank MB':>8} {'s/frame':>8}")
    started = time.perf_counter()
    for index in range(args.frames):
        frame = np.roll(picture, index, axis=1)
        tracker.step(index, frame, masks if index == 0 else None)
        if index % args.every == 0 or index == args.frames - 1:
            held = tracker.held_tensors()
            bank_mb = sum(t.numel() * t.element_size() for t in held) / 2**20
            elapsed = (time.perf_counter() - started) / (args.every if index else 1)
            print(f"{index:>6} {resident_mb():>12.1f} {peak_resident_mb():>8.1f} {len(held):>13} {bank_mb:>8.2f} "
                  f"{elapsed:>8.3f}", flush=True)
            started = time.perf_counter()


if __name__ == "__main__":
    main()
