"""mage_fast command line: generate, inpaint, edit, outpaint, info."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

DEFAULT_CKPT = os.path.join(os.path.dirname(__file__), "assets", "mage_fmnist.pt")


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA device")
    return dev


def load_model(ckpt: str | None, model_name: str | None):
    """Build the model for ``ckpt``: by factory name when given, else from the checkpoint itself."""
    import mage_fast
    from mage_fast.models import MODEL_FACTORIES
    from mage_fast.models.checkpoint import build_from_checkpoint
    if ckpt is None:
        if not os.path.isfile(DEFAULT_CKPT):
            raise SystemExit(f"error: no --ckpt given and the shipped default model {DEFAULT_CKPT} is not present")
        ckpt = DEFAULT_CKPT
    if not os.path.isfile(ckpt):
        raise SystemExit(f"error: checkpoint not found: {ckpt}")
    if model_name is None:
        return build_from_checkpoint(ckpt), ckpt
    if model_name not in MODEL_FACTORIES:
        raise SystemExit(f"error: --model must be one of {sorted(MODEL_FACTORIES)}, got {model_name!r}")
    model = MODEL_FACTORIES[model_name](vqgan_ckpt_path=None)
    mage_fast.load_checkpoint(model, ckpt)
    return model, ckpt


OFFICIAL_SAMPLING = {"num_iter": 20, "temperature": 6.0}


def model_card(ckpt: str) -> dict:
    """The checkpoint's model card, ``<ckpt>.json`` beside it ({} when there is none)."""
    import json
    card = os.path.splitext(ckpt)[0] + ".json"
    if not os.path.isfile(card):
        return {}
    with open(card) as f:
        return json.load(f)


def sampling_defaults(ckpt: str, args) -> None:
    """Fill --num-iter / --temperature left unset: from the checkpoint's model card (``<ckpt>.json``
    beside it, key ``sampling``) when there is one, else the official README setting (20, 6.0)."""
    rec = model_card(ckpt).get("sampling", {})
    for key, official in OFFICIAL_SAMPLING.items():
        if getattr(args, key) is None:
            setattr(args, key, rec.get(key, official))


def resolve_class(spec: str | None, ckpt: str):
    """``--class-id`` -> None, an int label, or "all" (image i gets label i mod the card's classes).

    Accepts a label number or a class name from the model card's ``classes`` list; with a card, the
    label must be one of its classes, and a card that says the model is not class-conditional
    refuses conditioning."""
    if spec is None:
        return None
    card = model_card(ckpt)
    names = card.get("classes")
    if card and not card.get("class_conditional", names is not None):
        raise SystemExit(f"error: {ckpt} was trained unconditionally (its model card says so); drop --class-id")
    if spec == "all":
        if not names:
            raise SystemExit("error: --class-id all needs a model card listing the classes")
        return "all"
    if spec.lstrip("-").isdigit():
        label = int(spec)
    elif names and spec in names:
        label = names.index(spec)
    else:
        known = f": one of {', '.join(names)}" if names else ""
        raise SystemExit(f"error: --class-id is a label number{' or a class name' if names else ''}{known}; "
                         f"got {spec!r}")
    if names and not 0 <= label < len(names):
        raise SystemExit(f"error: --class-id {label} is outside the model's {len(names)} classes (0..{len(names) - 1})")
    return label


def _batch_class_ids(label, start: int, n: int, num_classes: int):
    import torch
    if label is None:
        return None
    if label == "all":
        return torch.arange(start, start + n) % num_classes
    return torch.tensor([label])


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    import mage_fast
    from mage_fast.images import save_grid, save_pngs, to_uint8

    if args.num_images < 1 or args.batch_size < 1:
        raise SystemExit("error: --num-images and --batch-size must be >= 1")
    if args.rng == "official" and (args.class_id is not None or args.schedule != "cosine"
                                   or args.temperature_annealing != "linear"):
        print("note: class conditioning / non-official schedules use rng=torch")
        args.rng = "torch"
    dev = _device(args.device)
    try:
        model, ckpt = load_model(args.ckpt, args.model)
    except mage_fast.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    model = model.to(dev).eval()
    sampling_defaults(ckpt, args)
    label = resolve_class(args.class_id, ckpt)
    num_classes = len(model_card(ckpt).get("classes") or [])
    os.makedirs(args.out, exist_ok=True)
    num_batches = math.ceil(args.num_images / args.batch_size)
    grid_imgs, t0 = [], time.perf_counter()
    print(f"generating {args.num_images} images with {ckpt} on {dev} (T={args.num_iter}, "
          f"temperature={args.temperature}, rng={args.rng})")
    for b in tqdm(range(num_batches), desc="batches", unit="batch"):
        start = b * args.batch_size
        n = min(args.batch_size, args.num_images - start)
        # rng=official: batch b is seeded with (seed + b) at full batch size, as the official script.
        # rng=torch: one seed, images keyed by their global index (independent of --batch-size).
        seed = args.seed + b if args.rng == "official" else args.seed
        bs = args.batch_size if args.rng == "official" else n
        want_trace = args.process and b == 0
        out = mage_fast.generate(model, bs, num_iter=args.num_iter, temperature=args.temperature, seed=seed,
                                 rng=args.rng, first_index=start, schedule=args.schedule,
                                 temperature_annealing=args.temperature_annealing,
                                 class_ids=_batch_class_ids(label, start, bs, num_classes),
                                 guidance_scale=args.guidance, guidance_schedule=args.guidance_schedule,
                                 return_trace=want_trace)
        imgs = (out[0] if want_trace else out)[:n]
        if want_trace:
            path = save_process(model, out[1], os.path.join(args.out, "process.png"), rows=min(n, 4))
            print(f"decoding process: {path}")
        save_pngs(imgs, args.out, first_index=start)
        grid_imgs.extend(to_uint8(imgs)[: max(0, args.grid - len(grid_imgs))])
    grid = save_grid(grid_imgs, os.path.join(args.out, "grid.png"))
    dt = time.perf_counter() - t0
    print(f"wrote {args.num_images} PNGs and {grid} in {dt:.1f} s ({args.num_images / dt:.2f} images/s)")
    return 0


def save_process(model, trace: dict, path: str, rows: int = 4, max_cols: int = 8) -> str:
    """Rows = images, columns = steps (evenly chosen): the step's predicted image with the tokens
    still masked after it shaded grey; last column: when each token was fixed (blue early,
    yellow late, grey given)."""
    import numpy as np
    import torch

    from mage_fast.images import save_grid, shade_tokens, step_heatmap, to_uint8
    steps = trace["ids"].shape[0]
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
        tiles.append(step_heatmap(trace["fixed_at"][r].view(g, g).cpu().numpy(), steps + trace["start_step"],
                                  pics.shape[1]))
    return save_grid(tiles, path, ncol=len(cols) + 1)


def _edit_common(args, mode: str) -> int:
    import torch

    import mage_fast
    from mage_fast.editing import box_to_pixel_mask, inpaint, outpaint
    from mage_fast.images import load_image, save_grid, save_pngs, shade_tokens, to_uint8

    dev = _device(args.device)
    model, ckpt = load_model(args.ckpt, args.model)
    model = model.to(dev).eval()
    sampling_defaults(ckpt, args)
    label = resolve_class(args.class_id, ckpt)
    if label == "all":
        raise SystemExit(f"error: {mode} takes one --class-id, not 'all'")
    S = model.img_size
    if not os.path.isfile(args.image):
        raise SystemExit(f"error: image not found: {args.image}")
    img = load_image(args.image, S).to(dev)
    kw = dict(num_samples=args.num_samples, num_iter=args.num_iter, temperature=args.temperature, seed=args.seed,
              schedule=args.schedule, class_id=label, guidance_scale=args.guidance)
    try:
        if mode == "outpaint":
            res = outpaint(model, img, _parse_box(args.keep_box), **kw)
        else:
            if args.mask:
                from mage_fast.images import Image
                import numpy as np
                m = Image.open(args.mask).convert("L").resize((S, S), Image.NEAREST)
                region = torch.from_numpy(np.asarray(m) > 127)
            elif args.box:
                region = box_to_pixel_mask(_parse_box(args.box), S)
            else:
                raise SystemExit("error: give --box x0,y0,x1,y1 or --mask MASK.png")
            res = inpaint(model, img, region, grow=args.grow, **kw)
    except (ValueError, mage_fast.CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    save_pngs(res["images"], args.out)
    orig = to_uint8(img[None])[0]
    tiles = [orig, shade_tokens(orig, res["token_mask"].cpu().numpy())] + list(to_uint8(res["images"]))
    grid = save_grid(tiles, os.path.join(args.out, "before_after.png"), ncol=len(tiles))
    print(f"{mode}: regenerated {int(res['token_mask'].sum())} of {model.seq_len} tokens from schedule step "
          f"{res['start_step']}; wrote {args.num_samples} results and {grid} (original | region | results)")
    return 0


def _parse_box(text: str):
    try:
        box = [int(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise SystemExit(f"error: a box is x0,y0,x1,y1 in pixels, got {text!r}")
    return box


def cmd_inpaint(args) -> int:
    return _edit_common(args, "inpaint")


def cmd_edit(args) -> int:
    if args.class_id is None:
        raise SystemExit("error: edit needs --class-id (the class to paint into the region)")
    return _edit_common(args, "edit")


def cmd_outpaint(args) -> int:
    return _edit_common(args, "outpaint")


def cmd_eval(args) -> int:
    import json

    from mage_fast.eval import MAGEClassifier, extract_features, few_shot, finetune, linear_probe
    from mage_fast.eval.folder import list_image_folder

    dev = _device(args.device)
    model, ckpt = load_model(args.ckpt, args.model)
    model = model.to(dev).eval()
    rows = []
    if args.task in ("probe", "fewshot"):
        cache = args.cache_dir and os.path.join(args.cache_dir, os.path.basename(ckpt) + "-{}.pt")
        tr = extract_features(model, args.train_dir, args.batch_size, cache and cache.format("train"))
        te = extract_features(model, args.test_dir, args.batch_size, cache and cache.format("test"))
        if tr[2] != te[2]:
            raise SystemExit(f"error: train and test folders have different classes: {tr[2]} vs {te[2]}")
        if args.task == "probe":
            r = linear_probe(tr[0], tr[1], te[0], te[1], epochs=args.epochs, blr=args.blr)
            rows.append(("linear probe (official head, LARS)", f"{100 * r['top1']:.2f} %", f"{args.epochs} epochs"))
            result = r
        else:
            result = few_shot(tr[0], tr[1], te[0], te[1], shots=args.shots, seeds=range(args.seeds))
            for k, v in result.items():
                rows.append((f"{k}-shot logistic regression", f"{100 * v['mean']:.2f} +- {100 * v['std']:.2f} %",
                             f"{args.seeds} seeds"))
    else:
        train_items, classes = list_image_folder(args.train_dir)
        test_items, test_classes = list_image_folder(args.test_dir)
        clf = MAGEClassifier(model, len(classes)).to(dev)
        result = finetune(clf, train_items, test_items, epochs=args.epochs, batch_size=args.batch_size, blr=args.blr,
                          layer_decay=args.layer_decay)
        rows.append(("fine-tune (layer decay %.2f)" % args.layer_decay, f"{100 * result['top1']:.2f} %",
                     f"{args.epochs} epochs"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'task':<{width}} | top-1 | setting\n{'-' * width}-|-------|--------")
    for r in rows:
        print(f"{r[0]:<{width}} | {r[1]} | {r[2]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "checkpoint": ckpt, "result": result}, f, indent=2, default=str)
    return 0


def cmd_fid(args) -> int:
    import json

    from mage_fast.eval import fid_inception, offline_frechet
    out = {}
    try:
        out.update(offline_frechet(args.gen_dir, args.ref_dir, device=_device(args.device), ref_cache=args.ref_stats))
        print(f"offline Frechet distance (EfficientNet-Lite0 features; NOT comparable to published FID): "
              f"{out['frechet_efficientnet_lite0']:.3f} ({out['num_generated']} vs {out['num_reference']} images)")
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.inception_weights:
        try:
            out.update(fid_inception(args.gen_dir, args.ref_dir, args.inception_weights))
        except (ImportError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        print({k: v for k, v in out.items() if "inception" in k or "frechet_inception" in k})
    else:
        print("FID / IS (Inception-v3) skipped: pass --inception-weights PATH; nothing is downloaded")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def cmd_info(_args) -> int:
    from mage_fast.info import report
    print(report())
    return 0


def _decoding_args(p, with_annealing: bool = True) -> None:
    from mage_fast.sampling import SCHEDULES, TEMPERATURE_ANNEALING
    p.add_argument("--schedule", default="cosine", choices=sorted(SCHEDULES), help="mask schedule")
    if with_annealing:
        p.add_argument("--temperature-annealing", default="linear", choices=sorted(TEMPERATURE_ANNEALING))
    p.add_argument("--class-id", default=None,
                   help="class-conditional models: a label number, a class name from the model card, or 'all' "
                        "(generate: image i gets class i mod the number of classes)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mage_fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="unconditional generation to PNG files plus grid.png")
    g.add_argument("--ckpt", default=None, help="checkpoint ({'model': sd} official or mage_fast); "
                                               "default: the shipped small model")
    g.add_argument("--model", default=None, help="vit_base | vit_large | tiny (default: inferred from the checkpoint)")
    g.add_argument("--num-images", type=int, default=16)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--num-iter", type=int, default=None,
                   help="decoding steps (default: the checkpoint's model card, else the official 20)")
    g.add_argument("--temperature", type=float, default=None,
                   help="confidence-noise temperature (default: the model card's, else the official 6.0)")
    g.add_argument("--seed", type=int, default=0, help="rng=official: batch b uses seed + b, as the official script")
    g.add_argument("--rng", choices=("official", "torch"), default="official")
    g.add_argument("--device", default="auto")
    g.add_argument("--grid", type=int, default=64, help="how many images go into grid.png")
    g.add_argument("--process", action="store_true", help="also write process.png: decoding step by step")
    g.add_argument("--out", default="outputs/generate")
    _decoding_args(g)
    g.add_argument("--guidance-schedule", default="constant", choices=("constant", "linear"))
    g.set_defaults(fn=cmd_generate)
    for name, fn, helptext in (("inpaint", cmd_inpaint, "regenerate a box or mask of an image"),
                               ("edit", cmd_edit, "inpaint with a new class for the region (class-conditional)"),
                               ("outpaint", cmd_outpaint, "regenerate everything outside --keep-box")):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--image", required=True)
        if name == "outpaint":
            e.add_argument("--keep-box", required=True, help="x0,y0,x1,y1 in pixels of the model's image size")
        else:
            e.add_argument("--box", help="x0,y0,x1,y1 in pixels of the model's image size")
            e.add_argument("--mask", help="a mask image, white = regenerate")
            e.add_argument("--grow", type=int, default=1, help="tokens added around the region")
        e.add_argument("--ckpt", default=None)
        e.add_argument("--model", default=None)
        e.add_argument("--num-samples", type=int, default=4)
        e.add_argument("--num-iter", type=int, default=None,
                       help="decoding steps (default: the model card's, else the official 20)")
        e.add_argument("--temperature", type=float, default=None,
                       help="confidence-noise temperature (default: the model card's, else the official 6.0)")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--device", default="auto")
        e.add_argument("--out", default=f"outputs/{name}")
        _decoding_args(e, with_annealing=False)
        e.set_defaults(fn=fn)
    ev = sub.add_parser("eval", help="recognition: linear probe, few-shot, fine-tuning on ImageFolder data")
    ev.add_argument("task", choices=("probe", "fewshot", "finetune"))
    ev.add_argument("--ckpt", default=None)
    ev.add_argument("--model", default=None)
    ev.add_argument("--train-dir", required=True, help="ImageFolder root: train/<class>/<image>")
    ev.add_argument("--test-dir", required=True)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--epochs", type=int, default=90, help="probe: 90 as official; fine-tune: your budget")
    ev.add_argument("--blr", type=float, default=0.1, help="base lr (probe 0.1 official; fine-tune e.g. 5e-4)")
    ev.add_argument("--layer-decay", type=float, default=0.75)
    ev.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    ev.add_argument("--seeds", type=int, default=5)
    ev.add_argument("--cache-dir", default="outputs/features", help="feature cache ('' to disable)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", default=None)
    ev.set_defaults(fn=cmd_eval)
    fd = sub.add_parser("fid", help="offline Frechet distance (EfficientNet-Lite0) and, with weights, FID/IS")
    fd.add_argument("gen_dir")
    fd.add_argument("ref_dir")
    fd.add_argument("--inception-weights", default=None, help="Inception-v3 FID weights file (never downloaded)")
    fd.add_argument("--ref-stats", default=None,
                    help="cache file for REF_DIR's feature statistics: read if made for the same files, else written")
    fd.add_argument("--device", default="auto")
    fd.add_argument("--json", default=None)
    fd.set_defaults(fn=cmd_fid)
    i = sub.add_parser("info", help="versions, device and the backend each op uses")
    i.set_defaults(fn=cmd_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
