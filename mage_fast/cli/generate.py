"""``generate``: images to PNG files, a grid.png and a run.json manifest; under torchrun the ranks
share the work (:mod:`mage_fast.parallel`), and ``--fid-ref`` scores the images in the same pass."""
from __future__ import annotations

import math
import os
import sys
import time

from .common import (CLIError, add_model_args, add_run_folder_args, add_sampling_args, check_mode,
                     check_output_dir_for_file, check_sampling_args, class_names, load_model, model_summary, need,
                     pick_device, print_notes, resolve_class, sampling_config, sampling_defaults, slow_mode_note,
                     slow_mode_said_once, write_json_atomic)

NAME = "generate"
ORDER = 10
HELP = ("generate images (unconditional, or class-conditional with --class-id) to PNG files, a grid.png and a "
        "run.json manifest; under torchrun the ranks share the work")


def add_arguments(p) -> None:
    add_model_args(p)
    g = p.add_argument_group("images")
    g.add_argument("--num-images", type=int, default=16, help="images to generate")
    g.add_argument("--batch-size", type=int, default=16, help="images per network pass")
    g.add_argument("--grid", type=int, default=64, help="how many images go into grid.png (0: no grid)")
    g.add_argument("--process", action="store_true", help="also write process.png: decoding step by step")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the decoding loop as one CUDA graph and replay it per batch (CUDA, --rng torch)")
    add_sampling_args(p)
    add_run_folder_args(p, "outputs/generate", resumable=True)
    f = p.add_argument_group("Frechet distance in the same pass (every rank adds its images' features)")
    f.add_argument("--fid-ref", default=None, help="reference images (a folder or ImageFolder tree); default: none")
    f.add_argument("--ref-stats", default=None,
                   help="cache file for the reference statistics, keyed by the images' content")
    f.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's Inception-v3 FID weights file: FID instead of the offline "
                        "EfficientNet-Lite0 distance (default: none)")
    f.add_argument("--fid-json", default=None, help="also write the distance to this JSON file")


def run(args) -> int:
    """One process, or one rank of a torchrun job: see :mod:`mage_fast.parallel`. Under torchrun every
    rank checks its own view of the inputs (files, folders, its share of the reference images) after
    the process group is up and before anything is written; a fault on any rank ends every rank with
    status 2 and one ``error:`` line (:func:`mage_fast.parallel.fail_together`)."""
    from mage_fast import parallel
    rank, world, local_rank = parallel.dist_info()
    dev = pick_device(args.device)
    if world > 1 and dev.type == "cuda":
        import torch
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    parallel.init(dev.type)
    with parallel.checks_together():
        ref_set = _check_args(args, dev)
    with slow_mode_said_once():
        code = _run(args, dev, rank, world, ref_set)
    parallel.shutdown()  # on a fault the group stays up: main's handler claims the report in its store
    return code


def _check_args(args, dev):
    """Every check of ``generate`` that needs no model; returns ``--fid-ref``'s (files, note) or None."""
    check_sampling_args(args, "--num-images")
    need(args.batch_size, "--batch-size", lo=1, integer=True)
    need(args.grid, "--grid", lo=0, integer=True)
    check_mode(args, dev)
    if args.rng == "official" and (args.class_id is not None or args.schedule != "cosine"
                                   or args.temperature_annealing != "linear" or args.order != "confidence"):
        raise CLIError("--rng official reproduces the official unconditional sampler only (cosine schedule, linear "
                       "annealing, confidence order, no class); use --rng torch (the default) for other settings")
    if (args.ref_stats or args.inception_weights) and not args.fid_ref:
        raise CLIError("--ref-stats / --inception-weights go with --fid-ref REF_DIR (the reference images)")
    if args.fid_json and not args.fid_ref:
        raise CLIError("--fid-json goes with --fid-ref REF_DIR")
    if args.ref_stats:
        check_output_dir_for_file(args.ref_stats, "--ref-stats")  # the cache is (re)written there
    from mage_fast.runs import check_output_dir
    check_output_dir(args.out)
    ref_set = None
    if args.fid_ref:
        from mage_fast.eval.frechet import sample_files
        ref_set = sample_files(args.fid_ref, "--fid-ref")  # before any work: a missing or empty reference
        if args.inception_weights and not os.path.isfile(args.inception_weights):
            raise CLIError(f"--inception-weights not found: {args.inception_weights}")
    if args.cuda_graph and (dev.type != "cuda" or args.rng != "torch"):
        raise CLIError(f"--cuda-graph captures the decoding loop on a CUDA device with --rng torch; this run has "
                       f"--device {dev.type}, --rng {args.rng}")
    return ref_set


def _batch_class_ids(label, start: int, n: int, num_classes: int):
    import torch
    if label is None:
        return None
    if label == "all":
        return torch.arange(start, start + n) % num_classes
    return torch.tensor([label])


def _grid_layout(label, num_images: int, grid: int, names: list[str]):
    """Indices of the images that go into grid.png, the number of columns and the column labels.
    ``--class-id all``: one column per class (image i has class i mod C), each labelled with its
    name; one class: a title naming it; unconditional: a square-ish grid."""
    if label == "all":
        C = len(names)
        rows = max(1, min(grid // C if grid >= C else 1, math.ceil(num_images / C)))
        idx = [r * C + c for r in range(rows) for c in range(C) if r * C + c < num_images]
        return idx, C, names, None
    n = min(grid, num_images)
    title = None
    if label is not None:
        title = f"class {label}: {names[label]}" if names and label < len(names) else f"class {label}"
    return list(range(n)), None, None, title


def _fid_features(args, dev):
    from mage_fast.eval.frechet import EfficientNetFeatures, InceptionFeatures
    if args.inception_weights:
        return InceptionFeatures(args.inception_weights, dev)
    return EfficientNetFeatures(dev)


def _run(args, dev, rank: int, world: int, ref_set=None) -> int:
    """``ref_set``: (reference files, note) of ``--fid-ref``, listed by the caller."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    import mage_fast
    from mage_fast import parallel
    from mage_fast.images import save_grid, to_uint8
    from mage_fast.info import versions
    from mage_fast.runs import finish_run, prepare_run, sample_name, save_atomic_png

    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    feats = stats = ref = None
    with parallel.checks_together():  # each rank reads the model (and feature network) itself
        model, ckpt = load_model(args.ckpt, args.model)
        model = model.to(dev).eval()
        sampling_defaults(ckpt, args)
        label = resolve_class(args.class_id, ckpt, model)
        names = class_names(model, ckpt)
        if args.fid_ref:
            feats = _fid_features(args, dev)
    num_classes = len(names)
    if main:
        slow_mode_note(args.mode, dev)
    sampling = sampling_config(args)
    settings = sampling.manifest_settings()
    settings["class_id"] = label
    if args.rng == "official":  # the official script's images depend on the batch they are drawn in
        settings["batch_size"] = args.batch_size
    manifest = dict(kind="generate", **model_summary(ckpt), settings=settings, first_index=0,
                    num_images=args.num_images, sample_pattern="{:05d}.png", image_size=model.img_size,
                    classes=names or None, versions=versions(),
                    decode="the batch at once (official)" if args.rng == "official" else "one image at a time")
    if args.fid_ref:  # the reference set is input: read (each rank its share) before anything is written
        from mage_fast.eval.frechet import FeatureStats, sharded_stats
        from mage_fast.runs import check_run_folder
        with parallel.checks_together():  # no reading for a run that its folder refuses
            if main:
                check_run_folder(args.out, manifest, overwrite=args.overwrite, resume=args.resume)
        ref_files, note = ref_set
        if note and main:
            print_notes([note])
        ref = sharded_stats(ref_files, feats, cache=args.ref_stats, progress=main)
        stats = FeatureStats(ref["mu"].numel())
    done, err = set(), None
    if main:
        try:
            done = prepare_run(args.out, manifest, overwrite=args.overwrite, resume=args.resume,
                               image_size=model.img_size)
        except ValueError as e:
            err = str(e)
    done, err = parallel.broadcast((done, err))
    if err:
        raise CLIError(err)
    num_batches = math.ceil(args.num_images / args.batch_size)
    rounds = parallel.shard_rounds(num_batches, rank, world)
    t0, made = time.perf_counter(), 0
    say(f"generating {args.num_images} images with {ckpt} on {dev}"
        + (f" x {world} processes" if world > 1 else "") + f" (T={args.num_iter}, temperature={args.temperature}, "
        f"rng={args.rng}" + (f", class {label}" if label is not None else "")
        + (f", guidance {sampling.guidance_scale:g}" if sampling.guidance_scale else "")
        + (f", top-k {sampling.top_k}" if sampling.top_k else "")
        + (f", top-p {sampling.top_p:g}" if sampling.top_p else "") + ")")
    if done:
        say(f"resuming: {len(done)} of {args.num_images} images are already written and readable")
    bar = tqdm(total=args.num_images, initial=len(done), desc="images", unit="img", disable=not main)
    for batches in rounds:
        new = 0
        for b in batches:
            start = b * args.batch_size
            n = min(args.batch_size, args.num_images - start)
            want_trace = args.process and b == 0
            todo = [i for i in range(start, start + n) if i not in done]
            arrs = {}
            if todo or want_trace:
                # rng=official: batch b is seeded with (seed + b) at full batch size, as the official
                # script (and decoded at once, as it does). rng=torch: one seed, images keyed by their
                # global index, decoded one at a time, so no pixel depends on the batch or the ranks.
                batch_sampling = sampling.replace(seed=args.seed + b) if args.rng == "official" else sampling
                bs = args.batch_size if args.rng == "official" else n
                out = mage_fast.generate(model, bs, config=batch_sampling, first_index=start,
                                         class_ids=_batch_class_ids(label, start, bs, num_classes),
                                         return_trace=want_trace, cuda_graph=args.cuda_graph and not want_trace,
                                         decode_chunk=None if args.rng == "official" else 1)
                imgs = (out[0] if want_trace else out)[:n]
                if want_trace:
                    save_process(model, out[1], os.path.join(args.out, "process.png"), rows=min(n, 4))
                for i, arr in enumerate(to_uint8(imgs)):
                    arrs[start + i] = arr
                    if start + i not in done:
                        save_atomic_png(arr, os.path.join(args.out, sample_name(start + i)))
                        made += 1
                        new += 1
            if feats is not None:
                batch = [arrs[i] if i in arrs else np.asarray(Image.open(os.path.join(args.out, sample_name(i)))
                                                              .convert("RGB")) for i in range(start, start + n)]
                stats.add(feats(batch))
        bar.update(parallel.all_sum(new))
    bar.close()
    parallel.barrier()
    dt = time.perf_counter() - t0
    total_made = parallel.all_sum(made)
    fid = None
    if feats is not None:
        from mage_fast.eval.frechet import frechet_distance
        stats.all_reduce()
        mu, sigma = stats.mean_cov()
        if main and min(stats.n, int(ref["n"])) <= mu.numel():
            print(f"WARNING: only {min(stats.n, int(ref['n']))} images in the smaller set, no more than the "
                  f"{mu.numel()} feature dimensions: the distance is dominated by sample-size bias; compare only "
                  f"numbers computed on the same counts (MAGE's protocol: 50 000 samples)", file=sys.stderr)
        key = "frechet_inception" if feats.name.startswith("inception") else "frechet_efficientnet_lite0"
        fid = {key: frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "num_generated": stats.n,
               "num_reference": int(ref["n"]), "features": feats.name, "reference": os.path.abspath(args.fid_ref),
               "reference_content_sha256": ref["content_sha256"]}
        if key == "frechet_efficientnet_lite0":
            fid["note"] = "EfficientNet-Lite0 features: ranks quality offline, not comparable to published FID"
    if not main:
        return 0
    grid = None
    if args.grid:
        idx, ncol, labels, title = _grid_layout(label, args.num_images, args.grid, names)
        tiles = [np.asarray(Image.open(os.path.join(args.out, sample_name(i))).convert("RGB")) for i in idx]
        grid = save_grid(tiles, os.path.join(args.out, "grid.png"), ncol=ncol, col_labels=labels, title=title)
    extra = {"fid": fid} if fid else {}
    finish_run(args.out, images_written_this_run=total_made, seconds=round(dt, 3), processes=world, **extra)
    rate = f" ({total_made / dt:.2f} images/s)" if total_made and dt > 0 else ""
    print(f"wrote {total_made} PNGs{' and ' + grid if grid else ''} to {args.out} in {dt:.1f} s{rate}")
    if fid:
        what = "FID (Inception-v3)" if feats.name.startswith("inception") else \
            "offline Frechet distance (EfficientNet-Lite0 features; NOT comparable to published FID)"
        print(f"{what}: {fid[next(iter(fid))]:.3f} ({fid['num_generated']} vs {fid['num_reference']} images)")
        if args.fid_json:
            write_json_atomic(args.fid_json, fid)
    return 0


def save_process(model, trace: dict, path: str, rows: int = 4, max_cols: int = 8) -> str:
    """Rows = images, columns = steps (evenly chosen, labelled with their step numbers): the step's
    predicted image with the tokens still masked after it shaded grey; last column: when each token
    was fixed (blue early, yellow late, grey given), explained by a legend under the picture."""
    import numpy as np
    import torch

    from mage_fast.images import heatmap_legend, save_grid, shade_tokens, step_heatmap, to_uint8
    steps = trace["ids"].shape[0]
    start = trace["start_step"]
    cols = sorted(set(np.linspace(0, steps - 1, min(max_cols, steps)).round().astype(int).tolist()))
    g, mask_id = model.token_grid, model.mask_token_label
    tiles = []
    for r in range(rows):
        sampled = torch.stack([trace["sampled"][c, r] for c in cols])
        z = model.vqgan.quantize.get_codebook_entry(sampled, (len(cols), g, g, model.vqgan.quantize.e_dim))
        with torch.no_grad():
            pics = to_uint8(model.vqgan.decode(z))
        for j, c in enumerate(cols):
            tiles.append(shade_tokens(pics[j], (trace["ids"][c, r] == mask_id).view(g, g).cpu().numpy()))
        tiles.append(step_heatmap(trace["fixed_at"][r].view(g, g).cpu().numpy(), steps + start, pics.shape[1]))
    labels = [f"step {start + c + 1}" for c in cols] + ["fixed at"]
    total = steps + start
    tile_w = max(tiles[0].shape[1], 64)
    legend = heatmap_legend(total, width=(len(cols) + 1) * (tile_w + 2) + 2)
    return save_grid(tiles, path, ncol=len(cols) + 1, col_labels=labels,
                     title=f"decoding, {total} steps (grey: still masked)", footer=legend)
