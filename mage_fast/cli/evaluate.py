"""``eval``: recognition with the model's encoder features: linear probe, few-shot, fine-tuning on
ImageFolder data (:mod:`mage_fast.eval`)."""
from __future__ import annotations

import os
import sys

from .common import (CLIError, add_model_args, check_output_dir_for_file, load_model, need, pick_device,
                     write_json_atomic)

NAME = "eval"
ORDER = 50
HELP = "recognition: linear probe, few-shot, fine-tuning on ImageFolder data"

# The official probe: blr 0.1 at batch 16384, i.e. lr = 0.1 * 16384 / 256 = 6.4 for LARS.
OFFICIAL_PROBE_LR = 0.1 * 16384 / 256
PROBE_BATCH = 256
FINETUNE_BLR = 5e-4


def add_arguments(p) -> None:
    p.add_argument("task", choices=("probe", "fewshot", "finetune"), help="what to run")
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--train-dir", required=True, help="ImageFolder root: train/<class>/<image>")
    g.add_argument("--test-dir", required=True, help="ImageFolder root: test/<class>/<image>")
    g.add_argument("--limit", type=int, default=None,
                   help="use a seeded random subset of at most this many images of each split (default: all)")
    g.add_argument("--limit-seed", type=int, default=0, help="seed of the --limit subset")
    g.add_argument("--cache-dir", default="outputs/features",
                   help="feature cache, keyed by checkpoint bytes and image files ('' to disable)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=64, help="feature-extraction / fine-tuning batch")
    t.add_argument("--epochs", type=int, default=90, help="probe: 90 as official; fine-tune: your budget")
    t.add_argument("--blr", type=float, default=None,
                   help=f"base lr, lr = blr x batch / 256 (default: probe {OFFICIAL_PROBE_LR:g}, the official LARS "
                        f"step size, at its batch {PROBE_BATCH}; fine-tune {FINETUNE_BLR:g})")
    t.add_argument("--layer-decay", type=float, default=0.75, help="fine-tune: layer-wise lr decay")
    t.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="few-shot: images per class")
    t.add_argument("--seeds", type=int, default=5, help="few-shot: seeds per k")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")


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


def run(args) -> int:
    from mage_fast.eval import MAGEClassifier, extract_features, few_shot, finetune, linear_probe
    from mage_fast.eval.folder import list_image_folder

    need(args.batch_size, "--batch-size", lo=1, integer=True)
    need(args.epochs, "--epochs", lo=1, integer=True)
    if args.limit is not None:
        need(args.limit, "--limit", lo=2, integer=True)
    if args.blr is not None:
        need(args.blr, "--blr", lo=0, lo_open=True)
    if args.task == "fewshot":
        for k in args.shots:
            need(k, "--shots", lo=1, integer=True)
        need(args.seeds, "--seeds", lo=1, integer=True)
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
    dev = pick_device(args.device)
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
