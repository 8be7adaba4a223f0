"""Run a fixed set of `persam` commands and compare their outputs with an earlier snapshot.

A refactor must not change what the toolkit writes. This script runs the same commands on the
shared photos before and after it, with seeded random vit_t weights (no download needed), and
compares: every mask PNG byte for byte, and every results.json / scores.json / coco.json record
equal once the timings are left out.

    python scripts/snapshot_outputs.py take OUT_BEFORE      # before the change
    python scripts/snapshot_outputs.py take OUT_AFTER       # after it
    python scripts/snapshot_outputs.py compare OUT_BEFORE OUT_AFTER

Runs: segment with a mask, a click and a box; --multi; --finetune; learn + apply; --format coco;
track on car-shadow frames; eval perseg. Needs ../shared/data beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PERSEG = DATA / "perseg_subset"
CAT = PERSEG / "Images" / "cat"
CAR_SHADOW = DATA / "davis2017" / "JPEGImages" / "480p" / "car-shadow"
CAR_SHADOW_MASK = DATA / "davis2017" / "Annotations" / "480p" / "car-shadow" / "00000.png"
TIMING_KEYS = {"timings", "timing", "seconds", "time_s", "elapsed_s", "frames_per_s", "created", "started",
               "finished", "duration_s"}


def _random_checkpoint(path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    from sam.build import build_sam_model
    from sam_testing import random_state_dict

    torch.save(random_state_dict(build_sam_model("vit_t"), seed=0), path)


def _runs(out: Path, checkpoint: Path) -> List[List[str]]:
    model = ["--model", "vit_t", "--checkpoint", str(checkpoint), "-q", "--backend", "torch"]
    ref = ["--ref-image", str(CAT / "00.jpg")]
    ref_mask = ref + ["--ref-mask", str(PERSEG / "Annotations" / "cat" / "00.png")]
    targets = [str(CAT / "01.jpg"), str(CAT / "02.jpg"), str(PERSEG / "Images" / "colorful_sneaker" / "01.jpg")]
    frames = out / "frames"
    return [
        ["segment", *ref_mask, *targets, "--out", str(out / "mask"), *model],
        ["segment", *ref, "--ref-point", "640,700", *targets, "--out", str(out / "click"), *model],
        ["segment", *ref, "--ref-box", "300,300,1000,1100", *targets, "--out", str(out / "box"), *model],
        ["segment", *ref_mask, *targets, "--out", str(out / "multi"), "--multi", "--max-objects", "3", *model],
        ["segment", *ref_mask, *targets, "--out", str(out / "finetune"), "--finetune", *model],
        ["segment", *ref_mask, *targets, "--out", str(out / "coco"), "--format", "coco", *model],
        ["learn", *ref_mask, "--out", str(out / "cat.concept"), *model],
        ["apply", str(out / "cat.concept"), *targets, "--out", str(out / "apply"), *model],
        ["track", str(frames), "--ref-mask", str(CAR_SHADOW_MASK), "--out", str(out / "track"), *model],
        ["eval", "perseg", "--data", str(PERSEG), "--classes", "cat", "--out", str(out / "eval"), *model],
    ]


def take(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=False)
    checkpoint = out / "random_vit_t.pt"
    _random_checkpoint(checkpoint)
    frames = out / "frames"
    frames.mkdir()
    for frame in sorted(CAR_SHADOW.glob("*.jpg"))[:4]:
        (frames / frame.name).write_bytes(frame.read_bytes())
    env = dict(os.environ, PERSAM_BACKEND="torch")
    answers = []
    for argv in _runs(out, checkpoint):
        print("persam", " ".join(argv[:2]), "...", flush=True)
        done = subprocess.run([sys.executable, "-m", "persam", *argv], env=env, cwd=REPO, capture_output=True,
                              text=True)
        # a refusal is an output too (random weights find nothing at some prompts): kept and compared
        answers.append({"argv": argv[:2], "exit": done.returncode,
                        "errors": [line for line in done.stderr.splitlines() if line.startswith("persam: error")]})
    (out / "answers.json").write_text(json.dumps(answers, indent=1))
    return 0


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k not in TIMING_KEYS and not k.endswith(("_s", "_per_second"))}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _relative(value, root: str):
    """Paths inside a snapshot folder differ between snapshots: compare them relative to it."""
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<snapshot>")
    return value


def _files(root: Path) -> Dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def compare(before: Path, after: Path) -> int:
    old, new = _files(before), _files(after)
    problems = []
    for name in sorted(set(old) | set(new)):
        if name.endswith(".png") and not name.endswith("_similarity.png") and "frames/" not in name:
            if name not in old or name not in new:
                problems.append(f"{name}: only in {'after' if name in new else 'before'}")
            elif old[name].read_bytes() != new[name].read_bytes():
                problems.append(f"{name}: mask bytes differ")
        elif name.endswith(".json"):
            if name not in old or name not in new:
                problems.append(f"{name}: only in {'after' if name in new else 'before'}")
                continue
            a = _relative(_without_timings(json.loads(old[name].read_text())), str(before.resolve()))
            b = _relative(_without_timings(json.loads(new[name].read_text())), str(after.resolve()))
            if a != b:
                problems.append(f"{name}: records differ")
    masks = sum(1 for n in old if n.endswith(".png"))
    records = sum(1 for n in old if n.endswith(".json"))
    for line in problems:
        print(line)
    print(f"compared {masks} PNG files and {records} JSON files: {len(problems)} differences")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("take").add_argument("out", type=Path)
    q = sub.add_parser("compare")
    q.add_argument("before", type=Path)
    q.add_argument("after", type=Path)
    args = parser.parse_args()
    return take(args.out) if args.command == "take" else compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
