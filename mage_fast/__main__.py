"""mage_fast command line: generate, inpaint, outpaint, edit (sampling); eval (linear probe, few-shot,
fine-tuning), fid (sample quality); info (versions and backends).

Bad input or settings print one line on stderr, ``error: ...``, and exit with status 2 before any
output is written (set MAGE_FAST_DEBUG=1 for the traceback)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
# Shipped models, loadable by name (--ckpt NAME). The default is the first one present.
SHIPPED = ("mage_fmnist256", "mage_fmnist")


def shipped_path(name: str) -> str:
    return os.path.join(ASSETS, name + ".pt")


DEFAULT_CKPT = next((shipped_path(n) for n in SHIPPED if os.path.isfile(shipped_path(n))), shipped_path(SHIPPED[-1]))
CKPT_HELP = f"a shipped model by name ({', '.join(SHIPPED)}); default: {os.path.basename(DEFAULT_CKPT)[:-3]}"
SEED_MAX = 2 ** 31 - 1


class CLIError(Exception):
    """A command-line mistake: printed as ``error: <message>``, exit status 2."""


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name} was asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(ckpt: str | None, model_name: str | None):
    """Build the model for ``ckpt``: by factory name when given, else from the checkpoint itself."""
    import mage_fast
    from mage_fast.models import MODEL_FACTORIES
    from mage_fast.models.checkpoint import build_from_checkpoint, read_state_dict
    if ckpt is None:
        if not os.path.isfile(DEFAULT_CKPT):
            raise CLIError(f"no --ckpt given and the shipped default model {DEFAULT_CKPT} is not present")
        ckpt = DEFAULT_CKPT
    elif ckpt in SHIPPED and not os.path.exists(ckpt):
        if not os.path.isfile(shipped_path(ckpt)):
            raise CLIError(f"--ckpt {ckpt}: this install does not ship that model ({shipped_path(ckpt)} is absent)")
        ckpt = shipped_path(ckpt)
    if os.path.isdir(ckpt):
        raise CLIError(f"--ckpt {ckpt} is a directory; expected a checkpoint file")
    if not os.path.isfile(ckpt):
        raise CLIError(f"checkpoint not found: {ckpt}")
    # Built without drawing initial weights where the strict load that follows replaces them all.
    if model_name is None:
        return build_from_checkpoint(ckpt, init_weights=False), ckpt
    if model_name not in MODEL_FACTORIES:
        raise CLIError(f"--model must be one of {sorted(MODEL_FACTORIES)}, got {model_name!r}")
    sd = read_state_dict(ckpt)
    whole = "token_emb.word_embeddings.weight" in sd  # else a tokenizer-only file: the rest stays random
    model = MODEL_FACTORIES[model_name](vqgan_ckpt_path=None, init_weights=not whole)
    mage_fast.load_checkpoint(model, sd)
    return model.eval(), ckpt


OFFICIAL_SAMPLING = {"num_iter": 20, "temperature": 6.0}


def model_card(ckpt: str) -> dict:
    """The checkpoint's model card, ``<ckpt>.json`` beside it ({} when there is none)."""
    from mage_fast.models.checkpoint import read_model_card
    return read_model_card(ckpt)


def sampling_defaults(ckpt: str, args) -> None:
    """Fill --num-iter / --temperature left unset: from the checkpoint's model card (``<ckpt>.json``
    beside it, key ``sampling``) when there is one, else the official README setting (20, 6.0);
    --guidance left unset: the card's when a class is asked for (--class-id), else 0."""
    rec = model_card(ckpt).get("sampling", {})
    for key, official in OFFICIAL_SAMPLING.items():
        if getattr(args, key) is None:
            setattr(args, key, rec.get(key, official))
    if getattr(args, "guidance", 0.0) is None:
        args.guidance = float(rec.get("guidance", 0.0)) if args.class_id is not None else 0.0


def resolve_class(spec: str | None, ckpt: str, model=None):
    """``--class-id`` -> None, an int label, or "all" (image i gets label i mod the card's classes).

    Accepts a label number or a class name from the model card's ``classes`` list; with a card, the
    label must be one of its classes, and a card that says the model is not class-conditional
    refuses conditioning. Without a card the model's own range applies (``model.num_classes``, else
    the vocabulary's class range)."""
    if spec is None:
        return None
    card = model_card(ckpt)
    names = card.get("classes")
    if card and not card.get("class_conditional", names is not None):
        raise CLIError(f"{ckpt} was trained unconditionally (its model card says so); drop --class-id")
    if spec == "all":
        if not names:
            raise CLIError("--class-id all needs a model card listing the classes")
        return "all"
    if spec.lstrip("-").isdigit():
        label = int(spec)
    elif names and spec in names:
        label = names.index(spec)
    else:
        known = f": one of {', '.join(names)}" if names else ""
        raise CLIError(f"--class-id is a label number{' or a class name' if names else ''}{known}; got {spec!r}")
    n = len(names) if names else (getattr(model, "num_classes", None) or getattr(model, "num_classes_max", None))
    if n is not None and not 0 <= label < n:
        raise CLIError(f"--class-id {label} is outside the model's {n} classes (0..{n - 1})")
    return label


def _batch_class_ids(label, start: int, n: int, num_classes: int):
    import torch
    if label is None:
        return None
    if label == "all":
        return torch.arange(start, start + n) % num_classes
    return torch.tensor([label])


def _need(value, flag: str, lo=None, hi=None, integer=False, lo_open=False) -> None:
    from mage_fast.models.checks import check_number
    try:
        check_number(value, flag, lo=lo, hi=hi, integer=integer, lo_open=lo_open)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_sampling_args(args, count_flag: str) -> None:
    """Settings every sampling command shares, checked before anything is loaded or written."""
    _need(getattr(args, count_flag.lstrip("-").replace("-", "_")), count_flag, lo=1, integer=True)
    if args.num_iter is not None:
        _need(args.num_iter, "--num-iter", lo=1, hi=10_000, integer=True)
    if args.temperature is not None:
        _need(args.temperature, "--temperature", lo=0)
    if args.guidance is not None:
        _need(args.guidance, "--guidance", lo=0)
    _need(args.seed, "--seed", lo=0, hi=SEED_MAX, integer=True)
    if args.guidance is not None and args.guidance > 0 and args.class_id is None:
        raise CLIError("--guidance needs --class-id: classifier-free guidance steers towards a class")


def sampling_config(args, **changes):
    """The command's sampling settings as one :class:`mage_fast.decoding.SamplingConfig` (after
    :func:`sampling_defaults`); the flags a command lacks take generate()'s defaults, except the
    sampler: ``--rng`` when the command has it, else ``torch``."""
    from mage_fast.decoding import SamplingConfig
    kw = dict(num_iter=args.num_iter, temperature=args.temperature, seed=args.seed,
              sampler=getattr(args, "rng", "torch"), schedule=args.schedule, guidance_scale=args.guidance)
    for name in ("temperature_annealing", "guidance_schedule", "order", "mode"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    kw.update(changes)
    return SamplingConfig(**kw)


def _notes(notes: list) -> None:
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


def _slow_mode_note(spec: str, dev) -> None:
    """One note when ``--mode`` runs on ``dev`` but slower than fp32 (bf16 without bf16 units, int8
    without int8 units); the caller silences generate()'s own warning of the same."""
    from mage_fast.decoding import DecodeMode, resolve_mode, slow_mode_message
    mode = resolve_mode(spec)  # a bad spec was refused by cmd_generate
    slow = slow_mode_message(mode.quant, dev) if isinstance(mode, DecodeMode) else None  # registered modes: theirs
    if slow:
        _notes([f"--mode {spec}: {slow}"])


def _model_summary(ckpt: str) -> dict:
    from mage_fast.runs import file_sha256
    return {"model": os.path.abspath(ckpt), "model_sha256": file_sha256(ckpt)}


def class_names(model, ckpt: str) -> list[str]:
    names = model_card(ckpt).get("classes") or getattr(model, "class_names", None)
    return list(names) if names else []


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


def cmd_generate(args) -> int:
    """One process, or one rank of a torchrun job: see :mod:`mage_fast.parallel`. Under torchrun every
    rank checks its own view of the inputs (files, folders, its share of the reference images) after
    the process group is up and before anything is written; a fault on any rank ends every rank with
    status 2 and one ``error:`` line (:func:`mage_fast.parallel.fail_together`)."""
    from mage_fast import parallel
    rank, world, local_rank = parallel.dist_info()
    dev = _device(args.device)
    if world > 1 and dev.type == "cuda":
        import torch
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    parallel.init(dev.type)
    with parallel.checks_together():
        ref_set = _check_generate_args(args, dev)
    import warnings
    from mage_fast.decoding import SlowModeWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowModeWarning)  # said once, as a note (_slow_mode_note)
        code = _generate_run(args, dev, rank, world, ref_set)
    parallel.shutdown()  # on a fault the group stays up: main's handler claims the report in its store
    return code


def _check_generate_args(args, dev):
    """Every check of ``generate`` that needs no model; returns ``--fid-ref``'s (files, note) or None."""
    _check_sampling_args(args, "--num-images")
    _need(args.batch_size, "--batch-size", lo=1, integer=True)
    _need(args.grid, "--grid", lo=0, integer=True)
    from mage_fast.decoding import AUTO, auto_mode, resolve_mode
    if args.mode == AUTO:  # the preset for this device, by name, so run.json and --resume hold what ran
        args.mode = auto_mode(dev)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"--mode auto: {args.mode} on this {dev.type} "
                  f"({'bf16 multiplies natively' if args.mode.endswith('bf16') else 'fp32: bf16 is not native here'})",
                  file=sys.stderr)
    resolve_mode(args.mode)  # a bad --mode or spec: one line (ValueError, exit 2) before any folder is made
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


def _generate_run(args, dev, rank: int, world: int, ref_set=None) -> int:
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
        _slow_mode_note(args.mode, dev)
    sampling = sampling_config(args)
    settings = sampling.manifest_settings()
    settings["class_id"] = label
    if args.rng == "official":  # the official script's images depend on the batch they are drawn in
        settings["batch_size"] = args.batch_size
    manifest = dict(kind="generate", **_model_summary(ckpt), settings=settings, first_index=0,
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
            _notes([note])
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
        f"rng={args.rng}" + (f", class {label}" if label is not None else "") + ")")
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


def _read_mask(path: str, size: int):
    import numpy as np
    import torch

    from mage_fast.images import read_rgb
    from PIL import Image
    a = read_rgb(path)
    if a.shape[:2] != (size, size):
        im = Image.fromarray(np.round(a.mean(-1) * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
        gray = np.asarray(im) / 255.0
        print(f"note: --mask {path} is {a.shape[1]}x{a.shape[0]}: resized to {size}x{size} (nearest)",
              file=sys.stderr)
    else:
        gray = a.mean(-1)
    region = torch.from_numpy(gray > 0.5)
    if not bool(region.any()):
        raise CLIError(f"--mask {path} has no white pixel: nothing to regenerate (white = regenerate)")
    return region


def _edit_common(args, mode: str) -> int:
    from mage_fast.editing import box_to_pixel_mask, inpaint, outpaint
    from mage_fast.images import load_image, save_grid, shade_tokens, to_uint8
    from mage_fast.info import versions
    from mage_fast.runs import check_output_dir, file_sha256, finish_run, prepare_run, sample_name, save_atomic_png

    _check_sampling_args(args, "--num-samples")
    args.mask, args.box = getattr(args, "mask", None), getattr(args, "box", None)
    args.keep_box, args.grow = getattr(args, "keep_box", None), getattr(args, "grow", None)
    if mode != "outpaint":
        _need(args.grow, "--grow", lo=0, hi=64, integer=True)
        if not args.mask and not args.box:
            raise CLIError("give --box x0,y0,x1,y1 or --mask MASK.png")
        if args.mask and args.box:
            raise CLIError("give --box or --mask, not both")
    box = _parse_box(args.keep_box if mode == "outpaint" else args.box) if (mode == "outpaint" or args.box) else None
    if args.mask and not os.path.exists(args.mask):
        raise CLIError(f"--mask not found: {args.mask}")
    if os.path.isdir(args.image):
        raise CLIError(f"--image {args.image} is a directory; expected an image file")
    if not os.path.isfile(args.image):
        raise CLIError(f"--image not found: {args.image}")
    check_output_dir(args.out)
    dev = _device(args.device)
    model, ckpt = load_model(args.ckpt, args.model)
    model = model.to(dev).eval()
    sampling_defaults(ckpt, args)
    label = resolve_class(args.class_id, ckpt, model)
    if label == "all":
        raise CLIError(f"{mode} takes one --class-id, not 'all'")
    S = model.img_size
    notes: list[str] = []
    img = load_image(args.image, S, background=args.background, notes=notes, min_size=max(8, S // 8)).to(dev)
    _notes(notes)
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S):
            flag = "--keep-box" if mode == "outpaint" else "--box"
            raise CLIError(f"{flag} must satisfy 0 <= x0 < x1 <= {S} and 0 <= y0 < y1 <= {S} (pixels of the model's "
                           f"{S}x{S} input), got {','.join(map(str, box))}")
    region = _read_mask(args.mask, S) if args.mask else None
    sampling = sampling_config(args)
    kw = dict(num_samples=args.num_samples, class_id=label, progress=True, config=sampling)
    settings = sampling.manifest_settings(("num_iter", "temperature", "seed", "schedule", "guidance"))
    settings.update({k: getattr(args, k, None) for k in ("grow", "box", "keep_box", "background")})
    settings.update(class_id=label, image_sha256=file_sha256(args.image),
                    mask_sha256=file_sha256(args.mask) if args.mask else None)
    manifest = dict(kind=mode, **_model_summary(ckpt), settings=settings, first_index=0, num_images=args.num_samples,
                    sample_pattern="{:05d}.png", image=os.path.abspath(args.image), image_size=S, versions=versions())
    if mode == "outpaint":
        res_fn = lambda: outpaint(model, img, box, **kw)  # noqa: E731
    else:
        res_fn = lambda: inpaint(model, img, region if region is not None else box_to_pixel_mask(box, S),  # noqa: E731
                                 grow=args.grow, **kw)
    prepare_run(args.out, manifest, overwrite=args.overwrite, resume=False)
    res = res_fn()
    for i, arr in enumerate(to_uint8(res["images"])):
        save_atomic_png(arr, os.path.join(args.out, sample_name(i)))
    orig = to_uint8(img[None])[0]
    tiles = [orig, shade_tokens(orig, res["token_mask"].cpu().numpy())] + list(to_uint8(res["images"]))
    labels = ["original", "region"] + [f"result {i}" for i in range(args.num_samples)]
    grid = save_grid(tiles, os.path.join(args.out, "before_after.png"), ncol=len(tiles), col_labels=labels)
    finish_run(args.out)
    print(f"{mode}: regenerated {int(res['token_mask'].sum())} of {model.seq_len} tokens from schedule step "
          f"{res['start_step']}; wrote {args.num_samples} results and {grid} (original | region | results)")
    return 0


def _parse_box(text: str):
    try:
        box = [int(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise CLIError(f"a box is x0,y0,x1,y1 in pixels, got {text!r}")
    return box


def cmd_inpaint(args) -> int:
    return _edit_common(args, "inpaint")


def cmd_edit(args) -> int:
    if args.class_id is None:
        raise CLIError("edit needs --class-id (the class to paint into the region)")
    return _edit_common(args, "edit")


def cmd_outpaint(args) -> int:
    return _edit_common(args, "outpaint")


# The official probe: blr 0.1 at batch 16384, i.e. lr = 0.1 * 16384 / 256 = 6.4 for LARS.
OFFICIAL_PROBE_LR = 0.1 * 16384 / 256
PROBE_BATCH = 256
FINETUNE_BLR = 5e-4


def _subset(items: list, limit, seed: int) -> list:
    """A seeded random subset of ``limit`` items, kept in the folder's order."""
    if not limit or limit >= len(items):
        return items
    import random
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _feature_cache(cache_dir: str, ckpt: str, model, split: str, items: list) -> str:
    """A cache file keyed by everything that determines the features: the checkpoint's bytes, the
    model's image size, the exact files (path, size, mtime) and the mage_fast version."""
    import hashlib
    import json

    import mage_fast
    from mage_fast.runs import file_sha256
    h = hashlib.sha256()
    files = [(os.path.abspath(p), y, os.path.getsize(p), os.stat(p).st_mtime_ns) for p, y in items]
    h.update(json.dumps({"ckpt": file_sha256(ckpt), "img_size": model.img_size, "files": files,
                         "version": mage_fast.__version__, "features": "probe_features/1"}).encode())
    return os.path.join(cache_dir, f"{os.path.basename(ckpt)}-{split}-{h.hexdigest()[:20]}.pt")


def cmd_eval(args) -> int:
    from mage_fast.eval import MAGEClassifier, extract_features, few_shot, finetune, linear_probe
    from mage_fast.eval.folder import list_image_folder

    _need(args.batch_size, "--batch-size", lo=1, integer=True)
    _need(args.epochs, "--epochs", lo=1, integer=True)
    if args.limit is not None:
        _need(args.limit, "--limit", lo=2, integer=True)
    if args.blr is not None:
        _need(args.blr, "--blr", lo=0, lo_open=True)
    if args.task == "fewshot":
        for k in args.shots:
            _need(k, "--shots", lo=1, integer=True)
        _need(args.seeds, "--seeds", lo=1, integer=True)
    train_items, classes = list_image_folder(args.train_dir)
    test_items, test_classes = list_image_folder(args.test_dir)
    if classes != test_classes:
        raise CLIError(f"train and test folders have different classes: {classes} vs {test_classes}")
    train_items = _subset(train_items, args.limit, args.limit_seed)
    test_items = _subset(test_items, args.limit, args.limit_seed + 1)
    if args.limit:
        print(f"--limit {args.limit}: {len(train_items)} training and {len(test_items)} test images "
              f"(seeded subset, --limit-seed {args.limit_seed})")
    if args.json:
        check_output_dir_for_file(args.json)
    dev = _device(args.device)
    model, ckpt = load_model(args.ckpt, args.model)
    model = model.to(dev).eval()
    rows = []
    if args.task in ("probe", "fewshot"):
        if args.cache_dir:
            from mage_fast.runs import check_output_dir
            check_output_dir(args.cache_dir, "--cache-dir")
        tr_cache = args.cache_dir and _feature_cache(args.cache_dir, ckpt, model, "train", train_items)
        te_cache = args.cache_dir and _feature_cache(args.cache_dir, ckpt, model, "test", test_items)
        tr = extract_features(model, train_items, args.batch_size, tr_cache, classes=classes)
        te = extract_features(model, test_items, args.batch_size, te_cache, classes=classes)
        if args.task == "probe":
            blr = OFFICIAL_PROBE_LR * 256 / PROBE_BATCH if args.blr is None else args.blr
            lr = blr * PROBE_BATCH / 256
            if args.blr is None:
                print(f"probe lr {lr:g} (blr {blr:g} at batch {PROBE_BATCH}): the official run's LARS step size "
                      f"(blr 0.1 at batch 16384)")
            elif not OFFICIAL_PROBE_LR / 10 <= lr <= OFFICIAL_PROBE_LR * 10:
                print(f"warning: probe lr {lr:g} (--blr {blr:g} x batch {PROBE_BATCH} / 256) is far from the official "
                      f"run's {OFFICIAL_PROBE_LR:g} (blr 0.1 at batch 16384); LARS steps scale with the lr, so expect "
                      f"a {'badly under-trained' if lr < OFFICIAL_PROBE_LR else 'diverging'} probe. Leave --blr "
                      f"unset for the official step size.", file=sys.stderr)
            r = linear_probe(tr[0], tr[1], te[0], te[1], epochs=args.epochs, blr=blr, batch_size=PROBE_BATCH)
            rows.append(("linear probe (official head, LARS)", f"{100 * r['top1']:.2f} %",
                         f"{args.epochs} epochs, lr {lr:g}"))
            result = r
        else:
            result = few_shot(tr[0], tr[1], te[0], te[1], shots=args.shots, seeds=range(args.seeds))
            for k, v in result.items():
                rows.append((f"{k}-shot logistic regression", f"{100 * v['mean']:.2f} +- {100 * v['std']:.2f} %",
                             f"{args.seeds} seeds"))
    else:
        clf = MAGEClassifier(model, len(classes)).to(dev)
        blr = FINETUNE_BLR if args.blr is None else args.blr
        result = finetune(clf, train_items, test_items, epochs=args.epochs, batch_size=args.batch_size, blr=blr,
                          layer_decay=args.layer_decay)
        rows.append(("fine-tune (layer decay %.2f)" % args.layer_decay, f"{100 * result['top1']:.2f} %",
                     f"{args.epochs} epochs, blr {blr:g}"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'task':<{width}} | top-1 | setting\n{'-' * width}-|-------|--------")
    for r in rows:
        print(f"{r[0]:<{width}} | {r[1]} | {r[2]}")
    if args.json:
        write_json_atomic(args.json, {"task": args.task, "checkpoint": ckpt, "train_images": len(train_items),
                                      "test_images": len(test_items), "limit": args.limit, "result": result})
    return 0


def check_output_dir_for_file(path: str, flag: str = "--json") -> None:
    from mage_fast.runs import check_output_dir
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a directory; expected a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def write_json_atomic(path: str, obj) -> None:
    from mage_fast.runs import write_json
    write_json(path, obj, default=str)


def cmd_fid(args) -> int:
    from mage_fast.eval import fid_inception, offline_frechet
    from mage_fast.eval.frechet import FEATURE_DIM, sample_files

    _need(args.min_samples, "--min-samples", lo=2, integer=True)
    gen = sample_files(args.gen_dir, "GEN_DIR")
    ref = sample_files(args.ref_dir, "REF_DIR")
    for what, files in (("GEN_DIR", gen), ("REF_DIR", ref)):
        if len(files[0]) < args.min_samples:
            raise CLIError(f"{what} has {len(files[0])} image(s); a Frechet distance needs at least --min-samples "
                           f"{args.min_samples} (MAGE's protocol uses 50 000 samples)")
    _notes([n for _f, n in (gen, ref) if n])
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
    out.update(offline_frechet(gen[0], ref[0], device=_device(args.device), ref_cache=args.ref_stats))
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


def cmd_info(_args) -> int:
    from mage_fast.info import report
    print(report())
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already says what the default is."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (argparse.SUPPRESS,) or isinstance(action, argparse._VersionAction):
            return h
        if action.default is None and action.option_strings:
            return h + " (default: none)" if h else "(default: none)"
        return super()._get_help_string(action)


def _decoding_args(p, with_annealing: bool = True) -> None:
    from mage_fast.decoding import SCHEDULES, TEMPERATURE_ANNEALING
    p.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="mask schedule")
    if with_annealing:
        p.add_argument("--temperature-annealing", default="linear", choices=sorted(TEMPERATURE_ANNEALING),
                       help="how the confidence noise decays over the steps")
    p.add_argument("--class-id", default=None,
                   help="class-conditional models: a label number, a class name from the model card, or 'all' "
                        "(generate: image i gets class i mod the number of classes; one grid column per class); "
                        "default: unconditional")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, >= 0; needs --class-id (default: the model card's with "
                        "--class-id, else 0)")


def mode_help() -> str:
    """--mode's help, from the registry of modes (:data:`mage_fast.decoding.MODES`)."""
    from mage_fast.decoding import MODES, SPEC_HELP
    names = "; ".join(f"{name}: {summary}" for name, summary in MODES.table())
    return (f"decoding mode (default: exact): {names}; auto: fast_bf16 where this device multiplies bf16 "
            f"natively, else fast; or {SPEC_HELP}. docs/DECODING.md; "
            f"`python -m mage_fast info` lists them")


def _run_folder_args(p, resumable: bool) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its samples, grid and manifest)")
    if resumable:
        p.add_argument("--resume", action="store_true",
                       help="finish the run already in --out: the same settings, skipping images already written")


def build_parser() -> argparse.ArgumentParser:
    import torch

    import mage_fast
    p = argparse.ArgumentParser(prog="python -m mage_fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"mage_fast {mage_fast.__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name, helptext, **kw):
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter, **kw)

    g = add("generate", "generate images (unconditional, or class-conditional with --class-id) to PNG files, a "
                        "grid.png and a run.json manifest; under torchrun the ranks share the work")
    g.add_argument("--ckpt", default=None, help="checkpoint ({'model': sd} official or mage_fast); or " + CKPT_HELP)
    g.add_argument("--model", default=None, help="vit_base | vit_large | tiny (default: inferred from the checkpoint)")
    g.add_argument("--num-images", type=int, default=16, help="images to generate")
    g.add_argument("--batch-size", type=int, default=16, help="images per network pass")
    g.add_argument("--num-iter", type=int, default=None,
                   help="decoding steps (default: the checkpoint's model card, else the official 20)")
    g.add_argument("--temperature", type=float, default=None,
                   help="confidence-noise temperature, >= 0 (default: the model card's, else the official 6.0)")
    g.add_argument("--seed", type=int, default=0, help="random seed (rng=official: batch b uses seed + b)")
    g.add_argument("--rng", choices=("torch", "official"), default="torch",
                   help="torch: image i depends only on the seed and i (any batch size, resumable); official: the "
                        "official script's numbers exactly (batch b seeded with seed + b)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--grid", type=int, default=64, help="how many images go into grid.png (0: no grid)")
    g.add_argument("--process", action="store_true", help="also write process.png: decoding step by step")
    g.add_argument("--out", default="outputs/generate", help="output folder")
    _run_folder_args(g, resumable=True)
    _decoding_args(g)
    g.add_argument("--mode", default="exact", help=mode_help())
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the decoding loop as one CUDA graph and replay it per batch (CUDA, --rng torch)")
    g.add_argument("--order", default="confidence", choices=("confidence", "halton"),
                   help="which masked tokens a step fixes: the most confident (official) or a fixed Halton order "
                        "spread over the image (--rng torch)")
    g.add_argument("--guidance-schedule", default="constant", choices=("constant", "linear"),
                   help="constant: s at every step; linear: s (t+1)/T")
    f = g.add_argument_group("Frechet distance in the same pass (every rank adds its images' features)")
    f.add_argument("--fid-ref", default=None, help="reference images (a folder or ImageFolder tree); default: none")
    f.add_argument("--ref-stats", default=None,
                   help="cache file for the reference statistics, keyed by the images' content")
    f.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's Inception-v3 FID weights file: FID instead of the offline "
                        "EfficientNet-Lite0 distance (default: none)")
    f.add_argument("--fid-json", default=None, help="also write the distance to this JSON file")
    g.set_defaults(fn=cmd_generate)
    for name, fn, helptext in (("inpaint", cmd_inpaint, "regenerate a box or mask of an image"),
                               ("edit", cmd_edit, "inpaint with a new class for the region (class-conditional)"),
                               ("outpaint", cmd_outpaint, "regenerate everything outside --keep-box")):
        e = add(name, helptext)
        e.add_argument("--image", required=True, help="the image file (any size: centre-cropped and resized, "
                                                      "with a note)")
        if name == "outpaint":
            e.add_argument("--keep-box", required=True, help="x0,y0,x1,y1 in pixels of the model's image size")
        else:
            e.add_argument("--box", help="x0,y0,x1,y1 in pixels of the model's image size")
            e.add_argument("--mask", help="a mask image, white = regenerate")
            e.add_argument("--grow", type=int, default=1, help="tokens added around the region (>= 0)")
        e.add_argument("--background", default="black", choices=("black", "white", "gray"),
                       help="what transparent pixels of --image are composited over")
        e.add_argument("--ckpt", default=None, help="checkpoint file, or " + CKPT_HELP)
        e.add_argument("--model", default=None, help="vit_base | vit_large | tiny (default: inferred)")
        e.add_argument("--num-samples", type=int, default=4, help="alternatives to draw")
        e.add_argument("--num-iter", type=int, default=None,
                       help="decoding steps (default: the model card's, else the official 20)")
        e.add_argument("--temperature", type=float, default=None,
                       help="confidence-noise temperature, >= 0 (default: the model card's, else the official 6.0)")
        e.add_argument("--seed", type=int, default=0, help="random seed")
        e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        e.add_argument("--out", default=f"outputs/{name}", help="output folder")
        _run_folder_args(e, resumable=False)
        _decoding_args(e, with_annealing=False)
        e.set_defaults(fn=fn)
    ev = add("eval", "recognition: linear probe, few-shot, fine-tuning on ImageFolder data")
    ev.add_argument("task", choices=("probe", "fewshot", "finetune"), help="what to run")
    ev.add_argument("--ckpt", default=None, help="checkpoint file, or " + CKPT_HELP)
    ev.add_argument("--model", default=None, help="vit_base | vit_large | tiny (default: inferred)")
    ev.add_argument("--train-dir", required=True, help="ImageFolder root: train/<class>/<image>")
    ev.add_argument("--test-dir", required=True, help="ImageFolder root: test/<class>/<image>")
    ev.add_argument("--limit", type=int, default=None,
                    help="use a seeded random subset of at most this many images of each split (default: all)")
    ev.add_argument("--limit-seed", type=int, default=0, help="seed of the --limit subset")
    ev.add_argument("--batch-size", type=int, default=64, help="feature-extraction / fine-tuning batch")
    ev.add_argument("--epochs", type=int, default=90, help="probe: 90 as official; fine-tune: your budget")
    ev.add_argument("--blr", type=float, default=None,
                    help=f"base lr, lr = blr x batch / 256 (default: probe {OFFICIAL_PROBE_LR:g}, the official LARS "
                         f"step size, at its batch {PROBE_BATCH}; fine-tune {FINETUNE_BLR:g})")
    ev.add_argument("--layer-decay", type=float, default=0.75, help="fine-tune: layer-wise lr decay")
    ev.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="few-shot: images per class")
    ev.add_argument("--seeds", type=int, default=5, help="few-shot: seeds per k")
    ev.add_argument("--cache-dir", default="outputs/features",
                    help="feature cache, keyed by checkpoint bytes and image files ('' to disable)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--json", default=None, help="also write the result to this JSON file")
    ev.set_defaults(fn=cmd_eval)
    fd = add("fid", "offline Frechet distance (EfficientNet-Lite0) and, with weights, FID/IS")
    fd.add_argument("gen_dir", help="generated images: a run folder (its run.json lists the samples) or any folder")
    fd.add_argument("ref_dir", help="reference images: a folder, or an ImageFolder tree (root/<class>/<image>)")
    fd.add_argument("--inception-weights", default=None, help="Inception-v3 FID weights file (never downloaded)")
    fd.add_argument("--ref-stats", default=None,
                    help="cache file for REF_DIR's feature statistics: read if made for the same files, else written")
    fd.add_argument("--min-samples", type=int, default=100,
                    help="refuse folders with fewer images (a warning is printed below 1281)")
    fd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fd.add_argument("--json", default=None, help="also write the result to this JSON file")
    fd.set_defaults(fn=cmd_fid)
    i = add("info", "versions, device and the backend each op uses")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mage_fast import parallel, script_exit
    try:
        return args.fn(args)
    except (CLIError, ValueError, OSError, ImportError) as e:  # InputError, CheckpointError are ValueErrors
        if os.environ.get("MAGE_FAST_DEBUG"):
            raise
        from mage_fast.models.checkpoint import CheckpointError
        msg = " ".join(str(e).split()) if isinstance(e, CheckpointError) else str(e).strip()
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
            msg = f"{e.filename}: {e.strerror or e}"
        line = msg.splitlines()[0] if msg else type(e).__name__
        if parallel.active():  # a rank of several: the first to fail says it, naming itself
            script_exit.error_line(line)
        elif os.environ.get("RANK", "0") == "0":  # before the process group, every rank fails alike
            print(f"error: {line}", file=sys.stderr)
        return 2
    except Exception as e:
        if not parallel.active() or os.environ.get("MAGE_FAST_DEBUG"):
            raise  # one process: a crash keeps its traceback
        script_exit.rank_fault_exit(e)  # a crash on one rank, or a collective broken by a failed peer
        return 2


if __name__ == "__main__":
    sys.exit(main())
