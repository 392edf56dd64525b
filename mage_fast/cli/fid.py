"""``fid``: the offline Frechet distance (EfficientNet-Lite0 features) between two image folders
and, with Inception-v3 weights, FID / IS (:mod:`mage_fast.eval.frechet`)."""
from __future__ import annotations

import sys

from .common import (CLIError, add_device_arg, check_output_dir_for_file, need, pick_device, print_notes,
                     write_json_atomic)

NAME = "fid"
ORDER = 60
HELP = "offline Frechet distance (EfficientNet-Lite0) and, with weights, FID/IS"


def add_arguments(p) -> None:
    p.add_argument("gen_dir", help="generated images: a run folder (its run.json lists the samples) or any folder")
    p.add_argument("ref_dir", help="reference images: a folder, or an ImageFolder tree (root/<class>/<image>)")
    p.add_argument("--inception-weights", default=None, help="Inception-v3 FID weights file (never downloaded)")
    p.add_argument("--ref-stats", default=None,
                   help="cache file for REF_DIR's feature statistics: read if made for the same files, else written")
    p.add_argument("--min-samples", type=int, default=100,
                   help="refuse folders with fewer images (a warning is printed below 1281)")
    add_device_arg(p)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")


def run(args) -> int:
    from mage_fast.eval import fid_inception, offline_frechet
    from mage_fast.eval.frechet import FEATURE_DIM, sample_files

    need(args.min_samples, "--min-samples", lo=2, integer=True)
    gen = sample_files(args.gen_dir, "GEN_DIR")
    ref = sample_files(args.ref_dir, "REF_DIR")
    for what, files in (("GEN_DIR", gen), ("REF_DIR", ref)):
        if len(files[0]) < args.min_samples:
            raise CLIError(f"{what} has {len(files[0])} image(s); a Frechet distance needs at least --min-samples "
                           f"{args.min_samples} (MAGE's protocol uses 50 000 samples)")
    print_notes([n for _f, n in (gen, ref) if n])
    small = min(len(gen[0]), len(ref[0]))
    if small <= FEATURE_DIM:
        print(f"WARNING: only {small} images in the smaller set, no more than the {FEATURE_DIM} feature dimensions: "
              f"the covariance is rank-deficient and the distance is dominated by sample-size bias. Compare only "
              f"numbers computed on the same counts; use 5 000 or more for a result.", file=sys.stderr)
    if args.json:
        check_output_dir_for_file(args.json)
    if args.ref_stats:
        check_output_dir_for_file(args.ref_stats, "--ref-stats")  # the cache is (re)written there
    out = {}
    out.update(offline_frechet(gen[0], ref[0], device=pick_device(args.device), ref_cache=args.ref_stats))
    print(f"offline Frechet distance (EfficientNet-Lite0 features; NOT comparable to published FID): "
          f"{out['frechet_efficientnet_lite0']:.3f} ({out['num_generated']} vs {out['num_reference']} images)")
    if args.inception_weights:
        out.update(fid_inception(args.gen_dir, args.ref_dir, args.inception_weights))
        print({k: v for k, v in out.items() if "inception" in k or "frechet_inception" in k})
    else:
        print("FID / IS (Inception-v3) skipped: pass --inception-weights PATH; nothing is downloaded")
    if args.json:
        write_json_atomic(args.json, out)
    return 0
