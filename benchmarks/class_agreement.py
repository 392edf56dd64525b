"""Class agreement of a class-conditional Fashion-MNIST model: the share of each class's samples that
a classifier trained on the real training split calls that class, beside the classifier's own
accuracy on the real test split.

    python benchmarks/class_agreement.py                                  # the shipped default, its card's settings
    python benchmarks/class_agreement.py --ckpt run/mage.pth --per-class 100 --guidance 2 --mode fast

Samples are drawn as ``python -m mage_fast generate --class-id all`` draws them (image i has class
i mod 10, ``rng="torch"``, so image i is the same in any batch), decoded, rounded to 8 bits as the
PNGs are, and classified in memory. The classifier (mage_fast.eval.agreement) is trained once per
machine (a few CPU-minutes) and cached. ``--frechet N`` also gives the Frechet distance of the same
samples to N seeded test images, in the decoding yardstick's features (EfficientNet-Lite0 at 224
px, ``benchmarks/decode_quality.py``; N = 1 000 and seed 0 are its reference set). JSON to
benchmarks/results/ (``--out``).
"""
from __future__ import annotations

import math
import os
import sys
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def parse_args(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", default=None, help="a class-conditional Fashion-MNIST MAGE (default: the shipped default)")
    ap.add_argument("--per-class", type=int, default=100, help="samples per class (default: %(default)s)")
    ap.add_argument("--num-iter", type=int, default=None, help="decoding steps (default: the model card's)")
    ap.add_argument("--temperature", type=float, default=None, help="(default: the model card's)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model "
                                                                 "card's, else 0)")
    ap.add_argument("--top-k", type=int, default=None, help="token filter: K most likely codes; 0: all (default: the "
                                                            "model card's)")
    ap.add_argument("--top-p", type=float, default=None, help="token filter: nucleus mass in (0, 1]; 1: all "
                                                              "(default: the model card's)")
    ap.add_argument("--mode", default="exact", help="decoding mode (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=100, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--frechet", type=int, default=0, metavar="N",
                    help="also the Frechet distance to N seeded test images (0: not measured)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/class_agreement_<ckpt>_<device>_<kind>.json, "
                         "<kind> the machine kind: benchmarks/results/README.md)")
    args = ap.parse_args(argv)
    if args.per_class <= 0 or args.batch_size <= 0:
        ap.error("--per-class and --batch-size must be positive integers")
    if args.num_iter is not None and args.num_iter <= 0:
        ap.error(f"--num-iter must be a positive integer, got {args.num_iter}")
    if args.temperature is not None and not args.temperature >= 0:
        ap.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.guidance is not None and not args.guidance >= 0:
        ap.error(f"--guidance must be >= 0, got {args.guidance}")
    if args.top_k is not None and args.top_k < 0:
        ap.error(f"--top-k must be >= 0 (0: all codes), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1] (1: all codes), got {args.top_p}")
    if args.frechet < 0:
        ap.error(f"--frechet must be >= 0 (0: not measured), got {args.frechet}")
    if not 0 <= args.seed < 2 ** 31 or args.threads < 0:
        ap.error("--seed must be in [0, 2^31) and --threads >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    import mage_fast
    from common import environment, print_header, result_name, write_json
    from mage_fast.cli import CLIError, load_model, model_card, sampling_defaults, token_filter_settings
    from mage_fast.eval import agreement
    from mage_fast.eval.agreement import FMNIST_CLASSES, agreement_summary, sample_agreement
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        mage_fast.decoding.resolve_mode(args.mode)
    except ValueError as e:
        raise SystemExit(f"error: --mode {args.mode}: {e}")
    try:
        model, ckpt = load_model(args.ckpt, None)
    except CLIError as e:
        raise SystemExit(f"error: {e}")
    card = model_card(ckpt)
    classes = card.get("classes")
    if not card.get("class_conditional") or not classes or len(classes) != len(FMNIST_CLASSES):
        raise SystemExit(f"error: --ckpt {ckpt}: needs a class-conditional Fashion-MNIST model whose model card "
                         f"lists the 10 classes")
    # the card's defaults for what is unset, exactly as `generate --class-id all` takes them
    drawn = SimpleNamespace(num_iter=args.num_iter, temperature=args.temperature, guidance=args.guidance,
                               class_id="all", top_k=args.top_k, top_p=args.top_p)
    sampling_defaults(ckpt, drawn)
    num_iter, temperature, guidance = drawn.num_iter, drawn.temperature, drawn.guidance
    top_k, top_p = token_filter_settings(drawn.top_k, drawn.top_p)

    dev = next(model.parameters()).device
    env = environment(dev)
    print_header(f"class agreement: {os.path.basename(ckpt)}, {args.per_class} samples per class, T={num_iter}, "
                 f"temperature {temperature}, guidance {guidance}, top-k {top_k or 'all'}, top-p {top_p or 'all'}, "
                 f"mode {args.mode}, seed {args.seed}", env)
    classifier, scores = agreement.train_classifier()
    n = args.per_class * len(classes)
    labels = torch.arange(n) % len(classes)
    images = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, n, args.batch_size), total=math.ceil(n / args.batch_size), desc="sampling"):
        b = min(args.batch_size, n - i)
        with torch.inference_mode():
            x = mage_fast.generate(model.eval(), b, num_iter=num_iter, temperature=temperature, seed=args.seed,
                                   rng="torch", first_index=i, class_ids=labels[i:i + b].to(dev),
                                   guidance_scale=guidance, mode=args.mode, top_k=top_k, top_p=top_p)
        images.append(x.float().cpu())
    seconds = time.perf_counter() - t0
    images = torch.cat(images)
    res = sample_agreement(classifier, images, labels)
    for line in agreement_summary(res, scores):
        print(line)
    frechet = None
    if args.frechet:
        import decode_quality as dq  # the yardstick's features and reference images
        net = dq._efficientnet()
        ref = dq.features(net, dq.load_test_images(args.frechet, 0, model.img_size), 224)
        frechet = dq.fd(dq.features(net, dq.to_8bit(images), 224), ref)
        print(f"  Frechet distance (EfficientNet-Lite0, 224 px) to {args.frechet} test images: {frechet:.2f}")
    weakest = min(range(len(classes)), key=lambda c: res["per_class"][c])
    print(f"  weakest: {FMNIST_CLASSES[weakest]} {res['per_class'][weakest]:.3f}; sampling {seconds:.0f} s")
    out = write_json({"env": env, "ckpt": os.path.relpath(ckpt, REPO) if ckpt.startswith(REPO) else ckpt,
                      "settings": {"num_iter": num_iter, "temperature": temperature, "guidance": guidance,
                                   "top_k": top_k, "top_p": top_p, "mode": args.mode, "seed": args.seed,
                                   "per_class": args.per_class},
                      "classifier": scores, "agreement": res,
                      "agreement_over_accuracy": res["mean"] / scores["test_accuracy"],
                      "frechet": None if frechet is None else {"value": frechet, "test_images": args.frechet,
                                                               "test_seed": 0, "feature_size": 224},
                      "sampling_seconds": seconds},
                     args.out, result_name("class_agreement", dev, os.path.basename(ckpt).rsplit('.', 1)[0]))
    print(f"wrote {out}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
