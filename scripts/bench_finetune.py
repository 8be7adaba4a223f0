"""PerSAM-F fine-tuning: our cached-logits training versus the reference's per-step decoding.

    python scripts/bench_finetune.py [--model vit_t] [--checkpoint PATH] [--steps 1000]
                                     [--baseline-steps 1000] [--image PATH --mask PATH]

Times, in one run and on the same reference image and encoded features:
  reference   decode the three masks at every step, full-size logits, autograd loss (the original code);
  ours full   decode once, full-size logits, hand-written exact gradient;
  ours native decode once, the decoder's 256 x 256 logits (the default).
Prints seconds, ratios versus the reference and the learned weights; the
reference and "ours full" must agree to 1e-5. Without --checkpoint the
weights are random (timings stay meaningful: the work is the same).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "perseg_subset"

from persam.method.finetune import FinetuneSettings, finetune_loss, scale_weights  # noqa: E402
from persam.data.io import load_image, load_mask  # noqa: E402
from persam.method.locate import select_points, similarity_grid, similarity_map  # noqa: E402
from persam.method.pipeline import Concept, learn_concept  # noqa: E402
from sam.build import build_sam, build_sam_model  # noqa: E402
from sam.predictor import SamPredictor  # noqa: E402


def reference_procedure(predictor, concept, mask, steps, settings):
    """The original PerSAM-F loop: decoder and loss at full size at every step, autograd."""
    target = torch.from_numpy(mask.astype(np.float32))
    similarity = similarity_map(similarity_grid(predictor.features, concept.target_vector), predictor.upscale)
    points, labels = select_points(similarity, k_positive=1, k_negative=0)
    learned = torch.full((2,), 1 / 3, requires_grad=True)
    optimizer = torch.optim.AdamW([learned], lr=settings.lr, eps=settings.eps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    for _ in range(steps):
        logits = torch.from_numpy(predictor.predict(points, labels, multimask_output=True).logits)
        loss = finetune_loss(logits, target, scale_weights(learned), settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return scale_weights(learned.detach())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--baseline-steps", type=int, default=None, help="steps timed for the reference (default: --steps); fewer are extrapolated")
    parser.add_argument("--image", default=str(SHARED / "Images" / "cat" / "00.jpg"))
    parser.add_argument("--mask", default=str(SHARED / "Annotations" / "cat" / "00.png"))
    args = parser.parse_args()

    if args.checkpoint:
        model = build_sam(args.model, args.checkpoint)
    else:
        model = build_sam_model(args.model)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name and param.dim() > 1:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    predictor = SamPredictor(model)
    image, mask = load_image(args.image), load_mask(args.mask)
    print(f"reference image {args.image} ({image.shape[1]} x {image.shape[0]}), model {args.model}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}, torch threads {torch.get_num_threads()}")
    concept = learn_concept(predictor, [(image, mask)], method="persam")  # encodes once; target only
    concept = Concept("persam_f", concept.target_vector, concept.target_embedding)

    from persam.method.pipeline import learn_concept_weights

    encoded = [(predictor.features, predictor.original_size)]
    rows = []
    for resolution in ("full", "native"):
        settings = FinetuneSettings(steps=args.steps, loss_resolution=resolution)
        start = time.perf_counter()
        weights = learn_concept_weights(predictor, concept, [(image, mask)], encoded, settings)
        rows.append((f"ours ({resolution}, decoded once)", time.perf_counter() - start, weights))

    baseline_steps = args.baseline_steps or args.steps
    settings = FinetuneSettings(steps=args.steps, loss_resolution="full")
    predictor.set_embedding(*encoded[0])
    start = time.perf_counter()
    baseline_weights = reference_procedure(predictor, concept, mask, baseline_steps, settings)
    baseline_time = (time.perf_counter() - start) * args.steps / baseline_steps
    label = "reference (decode every step, full)" + ("" if baseline_steps == args.steps else f" [{baseline_steps} steps timed, scaled]")
    rows.insert(0, (label, baseline_time, baseline_weights if baseline_steps == args.steps else None))

    print(f"\n{'procedure':<52} {'seconds':>9} {'speed-up':>9}  weights")
    for name, seconds, weights in rows:
        shown = "-" if weights is None else np.array2string(weights.numpy(), precision=6)
        print(f"{name:<52} {seconds:9.2f} {baseline_time / seconds:8.1f}x  {shown}")
    if rows[0][2] is not None:
        difference = (rows[0][2] - rows[1][2]).abs().max().item()
        print(f"\nmax |weights(reference) - weights(ours full)| = {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
