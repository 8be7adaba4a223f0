"""Time each step of PerSAM / PerSAM-F per image on this machine.

    python scripts/bench_pipeline.py [--model vit_t] [--checkpoint PATH] [--device cpu] [--precision fp32]
                                     [--class cat] [--repeats 2]

Learns the concept from a shared PerSeg reference, then on each test image of
the class times: encode (the image encoder, once per image), locate
(similarity map and points), decode + refine (guided decoding and the two
refinements), and, once per reference, PerSAM-F fine-tuning (1000 steps) at
the native and at full resolution. Random weights when no checkpoint is given:
the work, and so the time, is the same.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from persam.finetune import FinetuneSettings
from persam.guide import attention_similarity, guided_prediction
from persam.io import load_image, load_mask
from persam.locate import select_points, similarity_grid, similarity_map
from persam.pipeline import Concept, learn_concept, learn_concept_weights
from persam.refine import best_mask, refine_with_box, refine_with_mask
from sam.build import build_sam, build_sam_model
from sam.predictor import SamPredictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "perseg_subset"


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--class", dest="class_name", default="cat")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the test images")
    args = parser.parse_args()

    model = build_sam(args.model, args.checkpoint, args.device) if args.checkpoint else build_sam_model(args.model).to(args.device)
    predictor = SamPredictor(model, precision=args.precision)
    images = sorted((SHARED / "Images" / args.class_name).glob("*.jpg"))
    reference_image = load_image(images[0])
    reference_mask = load_mask(SHARED / "Annotations" / args.class_name / (images[0].stem + ".png"))
    concept = learn_concept(predictor, [(reference_image, reference_mask)])
    encoded = [(predictor.features, predictor.original_size)]

    times = {"encode": [], "locate": [], "decode + refine": []}
    for _ in range(args.repeats):
        for path in images[1:]:
            image = load_image(path)
            _, seconds = timed(predictor.set_image, image)
            times["encode"].append(seconds)
            start = time.perf_counter()
            similarity = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
            points, labels = select_points(similarity, 1, 1)
            attention = attention_similarity(similarity, predictor.input_size, predictor.features.shape[-1], model.img_size)
            times["locate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            choice = best_mask(guided_prediction(predictor, points, labels, attention, concept.target_embedding))
            choice = refine_with_box(predictor, points, labels, refine_with_mask(predictor, points, labels, choice))
            times["decode + refine"].append(time.perf_counter() - start)

    persam_f = Concept("persam_f", concept.target_vector, concept.target_embedding)
    for resolution in ("native", "full"):
        settings = FinetuneSettings(loss_resolution=resolution)
        _, seconds = timed(learn_concept_weights, predictor, persam_f, [(reference_image, reference_mask)], encoded, settings)
        times[f"fine-tune ({resolution}, 1000 steps)"] = [seconds]

    print(f"{args.model} on {args.device} ({args.precision}), torch threads {torch.get_num_threads()}, "
          f"class {args.class_name}: {len(images) - 1} test images x {args.repeats}")
    for step, values in times.items():
        print(f"  {step:<32} {statistics.median(values):8.3f} s  (median of {len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
