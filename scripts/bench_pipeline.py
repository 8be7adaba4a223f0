"""Time each step of `persam segment` per photo on this machine, and the whole command.

    python scripts/bench_pipeline.py [--model vit_t] [--checkpoint PATH] [--backend auto] [--precision fp32]
                                     [--photos DIR] [--ref-class cat] [--repeats 2] [--batch-size 1]
                                     [--decode-group 4] [--method persam|persam_f] [--threads N] [--no-cli] [--finetune]

The concept is learned from a shared PerSeg reference (--ref-class, photo 00 and its mask);
then every photo of --photos (default the shared DreamBooth dog photos, 780 px) goes through
the steps of `persam segment`, each timed:

    load       decode the JPEG (persam.data.io.load_image)
    encode     the image encoder (--backend; with --batch-size B, B photos per encoder call,
               time per photo)
    locate     similarity map at full size, prompt points, guidance (PerSAM)
    decode     the prompt encoder + mask decoder calls (guided + two refinements), of which
               "upscale" is bringing low-res maps to the photo's size
    outputs    the overlay JPEG and mask PNG, encoded to bytes as the command writes them

and reports the median per photo, with locate + decode (the issue's "locate + decode +
refinements") and the sum. Then locate + decode again as `persam segment` makes them
(persam.method.pipeline.segment_images), alternating group by group: the same --decode-group photos
one at a time (--batch-size 1), their decoder calls made together in one thread, and made
together split over the torch threads as the command does (`workers`,
persam.method.pipeline.decode_workers; on a CPU of 2 threads, 2 halves side by side), per photo and
their ratios. One-time costs are printed apart: model loading, the backend's
build or cache load, learning the concept (and PerSAM-F's fine-tuning with --finetune).
Then, unless --no-cli, `persam segment` itself runs twice in this process on copies of the
photos (once on one photo, once on all) and the difference of the two wall times per extra
photo is the command's time per photo, everything included but model loading.
Then PerSAM's three decoder calls on the last photo are timed side by side, alternating, with
our decoder and with SAM's order of operations (projected attention, transposed convolutions,
channels-first layout), and their ratio printed.
Random weights when no checkpoint is given: the work, and so the time, is the same. Random
masks would be empty and skip the box refinement, so the random checkpoint is shifted to give
masks over the whole photo and every photo takes the three decoder calls of a real model
(--empty-masks: as they are; the number of decoder calls per photo is printed). Like the
`persam` command, the script makes malloc reuse freed memory (sam/memory.py; --default-malloc
keeps glibc's defaults, to compare).
"""

import argparse
import atexit
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))


class Stopwatch:
    """Accumulates the seconds spent in wrapped callables (re-entrant calls are counted once)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed

    def take(self):
        seconds, calls = self.seconds, self.calls
        self.seconds, self.calls = 0.0, 0
        return seconds, calls


def build(args):
    """(predictor, checkpoint path, one-time seconds by name)."""
    from persam.runs.models import build_predictor

    one_time = {}
    start = time.perf_counter()
    checkpoint = args.checkpoint
    if checkpoint is None:  # a random-weights checkpoint file, so that the command line can load it too
        from sam.build import build_sam_model
        from sam_testing import random_state_dict

        folder = tempfile.mkdtemp(prefix="bench_pipeline_")
        atexit.register(shutil.rmtree, folder, True)
        checkpoint = Path(folder) / f"{args.model}-random.pt"
        state = random_state_dict(build_sam_model(args.model), seed=0)
        if not args.empty_masks:
            make_masks_non_empty(state)
        torch.save(state, checkpoint)
    predictor = build_predictor(args.model, Path(checkpoint), "cpu", args.precision, args.backend)
    one_time["model load"] = time.perf_counter() - start
    start = time.perf_counter()
    runner = predictor.prepare()
    one_time[f"backend {predictor.backend} (build or cache load)"] = time.perf_counter() - start
    if getattr(runner, "build_seconds", 0.0):
        one_time[f"  of which the one-time {predictor.backend} export"] = runner.build_seconds
    return predictor, Path(checkpoint), one_time


def make_masks_non_empty(state) -> None:
    """Shift one channel of the upscaled mask features and of every mask token's weights, so that
    the random model's masks cover the image: random masks are empty, which skips the box
    refinement, while a real model takes all three decoder calls. The work of a call does not
    depend on the values."""
    state["mask_decoder.output_upscaling.3.bias"][0] = 10.0
    for key in state:
        if key.startswith("mask_decoder.output_hypernetworks_mlps.") and key.endswith(".layers.2.bias"):
            state[key][0] = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--backend", default="auto", help="auto, torch, openvino, onnxruntime (default auto)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--photos", default=str(SHARED / "dreambooth" / "dog"), help="folder of target photos")
    parser.add_argument("--ref-class", default="cat", help="PerSeg class of the reference (photo 00)")
    parser.add_argument("--method", default="persam", choices=("persam", "persam_f"))
    parser.add_argument("--repeats", type=int, default=2, help="passes over the photos (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="photos per encoder call (default 1)")
    parser.add_argument("--decode-group", type=int, default=4,
                        help="photos per decoder call in the grouped pass, as `persam segment --batch-size` (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    parser.add_argument("--finetune", action="store_true", help="also time PerSAM-F fine-tuning (1000 steps)")
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end `persam segment` runs")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch's operator profile of locate + decode (where the time goes)")
    parser.add_argument("--empty-masks", action="store_true",
                        help="random weights as they are: empty masks, so the box refinement is skipped")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (the persam command sets sam.memory.reuse_freed_memory)")
    args = parser.parse_args()
    malloc = "glibc defaults"
    if not args.default_malloc:
        from sam.memory import reuse_freed_memory

        malloc = "freed memory reused (as the persam command)" if reuse_freed_memory() else "unchanged"
    if args.threads:
        torch.set_num_threads(args.threads)

    from persam.method.guide import attention_similarity, guided_prediction
    from persam.data.io import encode_png, load_image, load_mask
    from persam.method.locate import select_points
    from persam.method.pipeline import decode_workers, learn_concept, locate, segment_images
    from persam.method.refine import best_upscaled, mixed_mask, refine_with_box, refine_with_mask
    from persam.data.visualize import overlay

    from bench_encoder import sgemm_peak  # the encoder benchmark's own measurement

    peak_before = sgemm_peak(torch.get_num_threads())
    predictor, checkpoint, one_time = build(args)
    reference = SHARED / "perseg_subset" / "Images" / args.ref_class / "00.jpg"
    reference_mask = SHARED / "perseg_subset" / "Annotations" / args.ref_class / "00.png"
    start = time.perf_counter()
    concept = learn_concept(predictor, [(load_image(reference), load_mask(reference_mask))], method=args.method)
    one_time[f"learn ({args.method})"] = time.perf_counter() - start
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no photos in {args.photos}")

    decoder, upscale = Stopwatch(), Stopwatch()
    model = predictor.model
    model.mask_decoder.forward = decoder.wrap(model.mask_decoder.forward)
    model.prompt_encoder.forward = decoder.wrap(model.prompt_encoder.forward)
    model.postprocess_masks = upscale.wrap(model.postprocess_masks)

    steps = {name: [] for name in ("load", "encode", "locate", "decode", "  upscale", "outputs")}
    decoder_calls = []
    encoded = {}  # photo -> its embedding, for the grouped pass
    profiler = contextlib.nullcontext()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    for _ in range(args.repeats):
        for first in range(0, len(photos), args.batch_size):
            chunk = photos[first:first + args.batch_size]
            loaded = []
            for path in chunk:
                t = time.perf_counter()
                loaded.append(load_image(path))
                steps["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            embeddings = predictor.encode_images(loaded)
            steps["encode"].extend([(time.perf_counter() - t) / len(chunk)] * len(chunk))
            encoded.update(zip(chunk, embeddings))
            for image, embedding in zip(loaded, embeddings):
                predictor.set_embedding(*embedding)
                upscale.take()
                t = time.perf_counter()
                similarity = locate(predictor, concept, embedding)
                if concept.method == "persam":
                    points, labels = select_points(similarity, 1, 1)
                    attention = attention_similarity(similarity, predictor.input_size, predictor.features.shape[-1],
                                                     model.img_size)
                steps["locate"].append(time.perf_counter() - t)
                decoder.take()
                t = time.perf_counter()
                with profiler if (args.profile and len(steps["decode"]) == 1) else contextlib.nullcontext():
                    if concept.method == "persam":
                        choice = best_upscaled(predictor, guided_prediction(
                            predictor, points, labels, attention, concept.target_embedding, full_size=False))
                        choice = refine_with_box(predictor, points, labels,
                                                 refine_with_mask(predictor, points, labels, choice))
                    else:
                        points, labels = select_points(similarity, 1, 0)
                        choice = mixed_mask(predictor.predict(points, labels, multimask_output=True),
                                            concept.scale_weights)
                        choice = refine_with_box(predictor, points, labels,
                                                 refine_with_box(predictor, points, labels, choice))
                choice.mask  # the final mask at full size, as segment returns it
                steps["decode"].append(time.perf_counter() - t)
                steps["  upscale"].append(upscale.take()[0])
                decoder_calls.append(decoder.take()[1] // 2)  # prompt encoder + mask decoder per call
                t = time.perf_counter()
                picture = overlay(image, [choice.mask] if choice.mask.any() else [], points, labels, None)
                import cv2

                cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                encode_png(np.asarray(choice.mask, dtype=bool))
                steps["outputs"].append(time.perf_counter() - t)

    # The grouped pass: locate + decode + refinements as `persam segment` makes them
    # (persam.method.pipeline.segment_images), alternating group by group: one photo at a time (the
    # command's --batch-size 1), the group in one thread, the group split over `workers` threads
    # (the command's --batch-size B on a CPU). The photos are taken round so that every group is full.
    def locate_and_decode(group, workers=1):
        t = time.perf_counter()
        for result in segment_images(predictor, concept, group, workers=workers):
            result.mask  # full size, as segment_images returns it
        return time.perf_counter() - t

    workers = decode_workers(predictor, args.decode_group)
    grouped, alone, threaded = [], [], []
    round_robin = [encoded[path] for path in photos] * args.decode_group
    for _ in range(args.repeats):
        for first in range(0, len(round_robin), args.decode_group):
            group = round_robin[first:first + args.decode_group]
            alone.append(sum(locate_and_decode([embedding]) for embedding in group) / len(group))
            grouped.append(locate_and_decode(group) / len(group))
            if workers > 1:
                threaded.append(locate_and_decode(group, workers) / len(group))

    if args.finetune:
        from persam.method.finetune import FinetuneSettings
        from persam.method.pipeline import Concept, learn_concept_weights

        persam_f = Concept("persam_f", concept.target_vector, concept.target_embedding)
        references = [(load_image(reference), load_mask(reference_mask))]
        encoded = [(predictor.set_image(references[0][0]).clone(), predictor.original_size)]
        for resolution in ("native", "full"):
            t = time.perf_counter()
            learn_concept_weights(predictor, persam_f, references, encoded, FinetuneSettings(loss_resolution=resolution))
            one_time[f"PerSAM-F fine-tune ({resolution}, 1000 steps)"] = time.perf_counter() - t

    size = load_image(photos[0]).shape
    print(f"{time.strftime('%Y-%m-%d')}: {args.model}, backend {predictor.backend}, {args.precision}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; method {concept.method}; "
          f"{len(photos)} photos of {Path(args.photos).name} ({size[1]} x {size[0]} first) x {args.repeats}, "
          f"batch {args.batch_size}; decoder calls per photo: {statistics.median(decoder_calls):.0f}; malloc: {malloc}")
    print(f"machine state: sgemm peak {peak_before:.0f} GFLOP/s before the run, "
          f"{sgemm_peak(torch.get_num_threads()):.0f} after (torch.mm 4096^2 fp32; a busy or throttled machine shows here)")
    print("one-time:")
    for name, seconds in one_time.items():
        print(f"  {name:<44} {seconds:8.3f} s")
    print("per photo (median):")
    medians = {name: statistics.median(values) for name, values in steps.items()}
    for name, value in medians.items():
        print(f"  {name:<44} {value:8.3f} s")
    print(f"  {'locate + decode (+ refinements)':<44} {medians['locate'] + medians['decode']:8.3f} s")
    total = sum(v for k, v in medians.items() if not k.startswith(" "))
    print(f"  {'sum':<44} {total:8.3f} s")
    print(f"locate + decode per photo, alternating (median of {len(grouped)} groups):")
    print(f"  {'one photo per decoder call (--batch-size 1)':<52} {statistics.median(alone):8.3f} s")
    print(f"  {f'{args.decode_group} photos per decoder call, one worker of {torch.get_num_threads()} threads':<52} "
          f"{statistics.median(grouped):8.3f} s  ({sum(grouped) / sum(alone):.2f} x)")
    if threaded:
        label = f"{args.decode_group} photos, {workers} workers (persam segment --batch-size {args.decode_group})"
        print(f"  {label:<52} {statistics.median(threaded):8.3f} s  ({sum(threaded) / sum(alone):.2f} x; "
              f"{sum(threaded) / sum(grouped):.2f} x one worker)")
    if concept.method == "persam":
        decoder_side_by_side(predictor, points, labels, attention, concept.target_embedding, args.repeats)
    if args.profile:
        print("decode, torch operators (one photo):")
        print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                                      max_name_column_width=40,
                                                                      max_shapes_column_width=60))
    if not args.no_cli:
        cli_per_photo(args, checkpoint, reference, reference_mask, photos)
    return 0


def decoder_side_by_side(predictor, points, labels, attention, target_embedding, repeats: int) -> None:
    """PerSAM's three decoder calls on the last photo, with our decoder and with SAM's order of
    operations (projected attention, transposed convolutions, channels-first layout; see
    tests/sam_testing.py), alternating, median per call."""
    from persam.method.guide import guided_prediction
    from sam_testing import sams_order_of_operations

    height, width = predictor.original_size
    box = np.array([width * 0.2, height * 0.2, width * 0.8, height * 0.8], np.float32)

    def calls():
        times = []
        t = time.perf_counter()
        first = guided_prediction(predictor, points, labels, attention, target_embedding, full_size=False)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        # the refinements as PerSAM makes them: multimask, the best mask alone (best_only)
        second = predictor.predict(points, labels, mask_input=first.low_res_logits[:1], full_size=False, best_only=True)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        predictor.predict(points, labels, box=box, mask_input=second.low_res_logits[:1], full_size=False, best_only=True)
        times.append(time.perf_counter() - t)
        return times

    measured = {"SAM's order": [], "ours": []}
    for _ in range(max(5, 5 * repeats)):
        with sams_order_of_operations():
            measured["SAM's order"].append(calls())
        measured["ours"].append(calls())
    print("decoder calls, side by side (median ms per call; prompt encoder + mask decoder, low-res output):")
    print(f"  {'':<14}{'guided':>9}{'refine 1':>10}{'refine 2':>10}{'sum':>9}")
    medians = {}
    for name, runs in measured.items():
        medians[name] = [statistics.median(run[i] for run in runs) * 1000 for i in range(3)]
        print(f"  {name:<14}" + "".join(f"{m:>9.1f} " for m in medians[name]) + f"{sum(medians[name]):>8.1f}")
    ratio = sum(medians["ours"]) / sum(medians["SAM's order"])
    print(f"  ours / SAM's order: {ratio:.2f}")


def cli_per_photo(args, checkpoint, reference, reference_mask, photos) -> None:
    """`persam segment` on one photo and on all photos; the difference per extra photo."""
    from persam.cli import commands as cli

    if len(photos) < 2:
        return
    walls = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_cli_") as work:
        for count in (1, len(photos)):
            folder = Path(work) / f"photos{count}"
            folder.mkdir()
            for path in photos[:count]:
                shutil.copy(path, folder / path.name)
            argv = ["segment", "--ref-image", str(reference), "--ref-mask", str(reference_mask), str(folder),
                    "--out", str(Path(work) / f"out{count}"), "--model", args.model, "--checkpoint", str(checkpoint),
                    "--backend", args.backend, "--precision", args.precision, "-q"]
            if args.method == "persam_f":
                argv.append("--finetune")
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(argv)
            walls[count] = time.perf_counter() - start
            if code not in (0, None):
                print(f"persam segment exited with {code}")
                return
    per_photo = (walls[len(photos)] - walls[1]) / (len(photos) - 1)
    print(f"persam segment: {walls[1]:.2f} s for 1 photo, {walls[len(photos)]:.2f} s for {len(photos)}: "
          f"{per_photo:.3f} s per photo, everything included but model loading")


if __name__ == "__main__":
    sys.exit(main())
