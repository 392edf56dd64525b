"""Quality of every decoding mode against the exact mode, on the same work.

For each mode (names in ``mage_fast.decoding.MODES`` or specs such as ``drop=all,refresh=2``),
on the shipped model (default) with its model-card sampling settings (steps, temperature, guidance),
class-balanced labels:

- KL divergence of the mode's code logits from the exact pass on the same decoding states (the
  mode's own trajectory; the exact pass is run beside it at every step), per step, averaged over
  the masked positions of the first ``--kl-samples`` images, and averaged over the positions the
  step fixed ("fixed KL": the logits the sampler actually drew the kept tokens from; a mode that
  leaves some masked rows on stale logits is judged by the rows it used);
- tokens that differ from exact decoding under the same random numbers (``rng="torch"``, same
  seed and image indices), as a fraction of all tokens;
- an offline Frechet distance (EfficientNet-Lite0 pooled features, images resized to
  ``--feature-size``) of ``--num-samples`` samples against as many test-split images; the exact
  mode is run with two seeds, and the distance between them and their two distances to the test
  split give the noise floor;
- class agreement (Fashion-MNIST models): the share of each class's samples that a CNN trained on
  the real training split (mage_fast.eval.agreement) calls that class, averaged over the classes,
  beside exact decoding's two seeds;
- images/s of each mode on this model (network passes plus tokenizer decode) and, with
  ``--throughput-json``, the ViT-B speed-up from ``decode_throughput.py`` for the plot.

    python benchmarks/decode_quality.py --num-samples 2000 --throughput-json \\
        benchmarks/results/decode_throughput_cpu_xeon_amx.json
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mage_fast  # noqa: E402
from common import environment, print_header, result_name, write_json  # noqa: E402
from mage_fast.decoding import MODES, mode_name, resolve_mode  # noqa: E402
from mage_fast.eval.agreement import FMNIST_CLASSES, agreement_of, predict, to_classifier_input, train_classifier  # noqa: E402
from mage_fast.eval.frechet import _efficientnet, frechet_distance, gaussian_stats  # noqa: E402

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


class KLProbe:
    """A mode whose network pass also runs the exact pass on the same ids and records, per step,
    the KL divergence KL(p_exact || p_mode) summed over codes and averaged over masked positions;
    ``per_position`` keeps each step's (B, L) KL (zero at known positions) for the fixed KL. With
    guidance the pass runs on (conditional, unconditional) rows, 2B of them: both count in the KL,
    and the fixed KL of an image averages its two rows."""

    def __init__(self, mode, log: dict):
        self.mode, self.log, self.per_position = resolve_mode(mode), log, []

    def build(self, model, counts, keys=None, choice=None):
        inner = self.mode.build(model, counts, keys, choice)

        def run(ids, class_tokens, i):
            out = inner(ids, class_tokens, i)
            ref = model.code_logits(ids, class_tokens)
            masked = ids == model.mask_token_label
            lp, lq = F.log_softmax(ref[masked].float(), -1), F.log_softmax(out[masked].float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # (n_masked,)
            self.log.setdefault(i, []).append((float(kl.sum()), int(kl.numel())))
            self.per_position.append(torch.zeros(masked.shape).masked_scatter(masked, kl))
            return out
        run.decode_images = inner.decode_images  # the mode's own pixel decode (NetworkPass), probed or not
        return run


YARDSTICK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yardstick.json")


def read_yardstick(path: str) -> dict:
    """The fixed evaluation settings (benchmarks/yardstick.json): one line of error for a bad file."""
    from mage_fast.models.checks import InputError, read_json_object
    try:
        return read_json_object(path, "--yardstick")
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


def load_test_images(n: int, seed: int, size: int = 28) -> torch.Tensor:
    """``n`` seeded-random Fashion-MNIST test images as (n, 3, size, size) in [0, 1]: the 28x28
    images padded with their black background to the model's ``size``, as its training data was
    (train/prepare_fashion_mnist.py --pad_to), so samples and references have the same geometry."""
    if size < 28 or (size - 28) % 2:
        raise SystemExit(f"error: the Fashion-MNIST reference is 28x28, padded evenly to the model's image size; "
                         f"a model of {size} px cannot be judged against it (expected 28, 30, 32, ...)")
    with gzip.open(FMNIST_TEST, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    idx = np.random.default_rng(seed).permutation(len(data))[:n]
    x = F.pad(torch.from_numpy(data[idx].copy()).float().div(255.0), [(size - 28) // 2] * 4)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def features(net, imgs: torch.Tensor, size: int, batch: int = 100) -> torch.Tensor:
    out = []
    for i in range(0, len(imgs), batch):
        x = F.interpolate(imgs[i: i + batch], size=size, mode="bilinear", align_corners=False)
        x = ((x * 255 - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)  # EfficientNet-Lite's input
        out.append(F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1).float())
    return torch.cat(out)


def to_8bit(imgs: torch.Tensor) -> torch.Tensor:
    """As saved to PNG: clamped to [0, 1] and rounded to 8 bits."""
    return imgs.clamp(0, 1).mul(255).round().div(255)


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


@torch.no_grad()
def run_mode(model, mode, n: int, bs: int, seed: int, T: int, temp: float, num_classes: int, kl_samples: int,
             order: str = "confidence", guidance: float = 0.0):
    imgs, ids, kl_log, fixed_log, secs, timed = [], [], {}, {}, 0.0, 0
    for start in range(0, n, bs):
        b = min(bs, n - start)
        labels = torch.arange(start, start + b) % num_classes
        probe = start < kl_samples and not resolve_mode(mode).is_exact
        m = KLProbe(mode, kl_log) if probe else mode
        t0 = time.perf_counter()
        out = mage_fast.generate(model, b, num_iter=T, temperature=temp, seed=seed, rng="torch", first_index=start,
                                 class_ids=labels, mode=m, return_ids=True, order=order, return_trace=probe,
                                 guidance_scale=guidance)
        im, tok = out[:2]
        if probe:  # KL at the positions each step fixed
            fixed_at = out[2]["fixed_at"]
            for i, kl_i in enumerate(m.per_position):
                if kl_i.shape[0] != fixed_at.shape[0]:  # guided: the pass ran on (conditional, unconditional)
                    kl_i = kl_i.view(-1, *fixed_at.shape).mean(0)
                at = fixed_at == i
                fixed_log.setdefault(i, []).append((float(kl_i[at].sum()), int(at.sum())))
        if not probe:
            secs += time.perf_counter() - t0
            timed += b
        imgs.append(to_8bit(im))
        ids.append(tok)
    kl, kl_fixed = ({int(i): s / max(c, 1) for i, v in sorted(log.items()) for s, c in [tuple(map(sum, zip(*v)))]}
                    for log in (kl_log, fixed_log))
    return torch.cat(imgs), torch.cat(ids), (kl, kl_fixed), (timed / secs if secs > 0 else None)


def exact_run(cache_dir, key: dict, compute):
    """``compute()`` -> (features, ids, images/s, classifier calls or None) of one exact run, read from ``cache_dir`` when an
    earlier run of the same work (same checkpoint file, settings, seed and feature size) stored it
    there; written atomically after computing. ``cache_dir`` None: always computed."""
    if not cache_dir:
        return compute()
    import hashlib
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"exact_{digest}.pt")
    if os.path.isfile(path):
        hit = torch.load(path, map_location="cpu", weights_only=True)
        if hit.get("key") == key:
            print(f"  exact seed {key['seed']}: from {path}")
            return hit["features"], hit["ids"], hit["images_per_s"], hit.get("calls")
    feat, ids, speed, calls = compute()
    os.makedirs(cache_dir, exist_ok=True)
    torch.save({"key": key, "features": feat, "ids": ids, "images_per_s": speed, "calls": calls}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return feat, ids, speed, calls


def plot(rows, path, x_key, x_label):
    """Frechet distance against speed, one point per mode; the exact mode's two seeds span the
    noise band. matplotlib when installed, else drawn with PIL."""
    pts = [r for r in rows if r.get(x_key)]
    ex = [r["frechet"] for r in rows if r["mode"].startswith("exact")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(pts, ex, path, x_key, x_label)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        ax.scatter(r[x_key], r["frechet"], color="k" if r["mode"] == "exact" else "tab:blue")
        ax.annotate(r["mode"], (r[x_key], r["frechet"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhspan(min(ex), max(ex), color="0.85", label="exact, its seeds (noise floor)")
    ax.set_xlabel(x_label)
    ax.set_ylabel("Frechet distance to the test split (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _plot_pil(pts, ex, path, x_key, x_label, off_scale: float = 1.06):
    """The plot drawn with PIL: points more than ``off_scale`` x the exact band's top sit on the top
    edge (a triangle, their value in the label), so a far outlier does not flatten the rest; each
    label takes the first nearby place that overlaps no other label, with a leader line."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, pad = 1000, 620, 80
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:
        font = ImageFont.load_default()
    cap = max(ex) * off_scale
    xs = [r[x_key] for r in pts]
    ys = [min(r["frechet"], cap) for r in pts] + ex
    x_lo, x_hi = 0.0, max(xs) * 1.12
    span = max(ys) - min(ys) or 1.0
    y_lo, y_hi = min(ys) - 0.08 * span, max(ys) + 0.08 * span

    def xy(x, y):
        return pad + (W - 2 * pad) * (x - x_lo) / (x_hi - x_lo), H - pad - (H - 2 * pad) * (y - y_lo) / (y_hi - y_lo)

    band = [xy(x_lo, max(ex)), xy(x_hi, min(ex))]
    d.rectangle([band[0][0], band[0][1], band[1][0], band[1][1]], fill="#dddddd")
    d.line([(pad, H - pad), (W - pad, H - pad)], fill="black")
    d.line([(pad, pad), (pad, H - pad)], fill="black")
    for k in range(6):
        xv, yv = x_lo + (x_hi - x_lo) * k / 5, y_lo + (y_hi - y_lo) * k / 5
        px, _ = xy(xv, y_lo)
        _, py = xy(x_lo, yv)
        d.text((px - 10, H - pad + 6), f"{xv:.2f}", fill="black", font=font)
        d.text((8, py - 7), f"{yv:.2f}", fill="black", font=font)
    placed = []
    offsets = [(8, -16), (8, 4), (-8, -16), (-8, 4)] + [(dx, dy) for k in range(1, 8) for dy in (-16 - 15 * k, 4 + 15 * k)
                                                         for dx in (8, -8)]
    for r in sorted(pts, key=lambda r: r[x_key]):
        over = r["frechet"] > cap
        px, py = xy(r[x_key], min(r["frechet"], cap))
        color = "black" if r["mode"] == "exact" else "#1f77b4"
        if over:
            d.polygon([(px, py - 6), (px - 5, py + 3), (px + 5, py + 3)], fill="#d62728")
        else:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        label = f"{r['mode']} ({r['frechet']:.1f}, off scale)" if over else r["mode"]
        w = d.textlength(label, font=font)
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + 13)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed) \
                    and pad < box[0] and box[2] < W - 4 and 40 < box[1] and box[3] < H - pad:
                break
        placed.append(box)
        if abs(dy) > 16:
            d.line([(px, py), (box[0] if dx > 0 else box[2], box[1] + 6)], fill="#999999")
        d.text((box[0], box[1]), label, fill="black", font=font)
    d.text((pad, H - pad + 28), x_label, fill="black", font=font)
    d.text((pad, 20), "Frechet distance to the test split (lower is better); grey band: exact mode, its seeds",
           fill="black", font=font)
    img.save(path)
    return path


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None, help="default: the shipped model")
    p.add_argument("--modes", nargs="*", default=[n for n in MODES if n != "exact"],
                   help="modes to judge (default: every named mode); none: only the floor (with --floor-seeds)")
    p.add_argument("--step-points", nargs="*", default=[], metavar="ORDER:T",
                   help="exact passes with another order or step count as points on the same curve, e.g. "
                        "halton:12 confidence:8 halton:8 (their ViT-B speed is the exact mode's times the step "
                        "ratio: every exact step costs the same)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--kl-samples", type=int, default=250, help="images whose steps get the KL probe")
    p.add_argument("--num-iter", type=int, default=None, help="default: the model card's")
    p.add_argument("--temperature", type=float, default=None, help="default: the model card's")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance, >= 0 (default: the model card's, else 0; class-conditional models)")
    p.add_argument("--feature-size", type=int, default=112, help="EfficientNet-Lite0 input size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--throughput-json", default=None, help="decode_throughput.py JSON for the ViT-B speed axis")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/decode_quality_<model>_cpu_<kind>.json, <kind> "
                        "the machine kind: benchmarks/results/README.md)")
    p.add_argument("--exact-cache", default=None, metavar="DIR",
                   help="keep the exact mode's two runs (features, ids, speed) in DIR and reuse them when the "
                        "checkpoint file and settings are the same: later modes cost only their own runs "
                        "(default: none, always computed)")
    p.add_argument("--floor-seeds", nargs="*", type=int, default=[], metavar="SEED",
                   help="more exact runs for the noise floor, beside the yardstick's two: each one's distance to "
                        "the test split and to the first seed's samples joins the floor (cached with --exact-cache)")
    p.add_argument("--floor-from", default=None, metavar="JSON",
                   help="a decode_quality JSON of the same checkpoint and settings: take its noise floor (both exact "
                        "seeds) and run only the first exact seed (the modes' reference samples and tokens), "
                        "about half the exact work when no --exact-cache holds them")
    p.add_argument("--replot", default=None, help="a decode_quality JSON: redo its plot (with --throughput-json)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="decode_quality JSONs of the same yardstick and checkpoint: one JSON (--out) and one plot "
                        "with every row (a mode in several: the first file's), the floor of the file with most seeds")
    p.add_argument("--yardstick", default=YARDSTICK,
                   help="JSON of fixed evaluation settings used as the defaults (benchmarks/yardstick.json)")
    pre, _ = p.parse_known_args(argv)
    ys = read_yardstick(pre.yardstick)
    p.set_defaults(**{k: ys[k] for k in ("ckpt", "num_samples", "batch_size", "kl_samples", "num_iter",
                                        "temperature", "guidance", "feature_size") if k in ys})
    args = p.parse_args(argv)
    seeds = list(ys.get("seeds", [0, 1]))
    ref_seed = int(ys.get("reference", {}).get("seed", 0))
    if len(seeds) != 2:
        raise SystemExit(f"error: {pre.yardstick}: 'seeds' must hold two seeds (the exact mode's noise floor)")
    if set(args.floor_seeds) & set(seeds) or len(set(args.floor_seeds)) != len(args.floor_seeds) \
            or any(s < 0 for s in args.floor_seeds):
        raise SystemExit(f"error: --floor-seeds must be distinct seeds >= 0 other than the yardstick's {seeds}, "
                         f"got {args.floor_seeds}")
    step_points = []
    for point in args.step_points:
        order, _, t = point.partition(":")
        if order not in ("confidence", "halton") or not t.isdigit() or int(t) < 1:
            raise SystemExit(f"error: --step-points takes ORDER:T with ORDER confidence or halton, got {point!r}")
        step_points.append((order, t))
    if args.exact_cache:  # before hours of work: the cache must be a writable folder
        try:
            os.makedirs(args.exact_cache, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: --exact-cache {args.exact_cache} is not a usable folder ({e})") from None
        if not os.access(args.exact_cache, os.W_OK):
            raise SystemExit(f"error: --exact-cache {args.exact_cache} is not writable")
    prior_floor = None
    if args.floor_from:  # checked before any work
        try:
            with open(args.floor_from) as f:
                prior = json.load(f)
            prior_floor = prior["noise_floor"]
            prior_floor = {k: prior_floor[k] for k in ("exact_seed0_vs_test", "exact_seed1_vs_test",
                                                        "exact_seed0_vs_seed1", "token_diff_seed0_vs_seed1")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --floor-from {args.floor_from}: not a readable decode_quality JSON with a "
                             f"two-seed noise floor ({type(e).__name__}: {e})") from None
    if args.replot:
        return replot(args.replot, args.throughput_json)
    if args.merge:
        return merge(args.merge, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mage_fast.cli import load_model, model_card, sampling_defaults
    model, ckpt = load_model(args.ckpt, None)
    model.eval()
    num_classes = len(model_card(ckpt).get("classes", [])) or 1
    drawn = SimpleNamespace(num_iter=args.num_iter, temperature=args.temperature, guidance=args.guidance,
                               class_id="all" if num_classes > 1 else None)
    sampling_defaults(ckpt, drawn)  # the card's defaults for what is unset, as the CLI takes them
    T, temp = drawn.num_iter, drawn.temperature
    G = float(drawn.guidance) if num_classes > 1 else 0.0
    if not G >= 0:
        raise SystemExit(f"error: --guidance must be >= 0, got {G}")
    if prior_floor is not None:
        want = dict(checkpoint=os.path.basename(ckpt), num_samples=args.num_samples, num_iter=T, temperature=temp,
                    guidance=G, seeds=seeds, feature_size=args.feature_size)
        have = dict(checkpoint=os.path.basename(str(prior.get("checkpoint"))), num_samples=prior.get("num_samples"),
                    num_iter=prior.get("num_iter"), temperature=prior.get("temperature"),
                    guidance=float(prior.get("guidance", 0.0)), seeds=prior.get("seeds"),
                    feature_size=int(str(prior.get("feature_extractor", "")).rsplit("to ", 1)[-1].split()[0] or -1)
                    if "to " in str(prior.get("feature_extractor", "")) else None)
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if diff:
            raise SystemExit(f"error: --floor-from {args.floor_from} measured other work: "
                             + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()))
    env = environment(torch.device("cpu"))
    env["load_average_at_start"] = os.getloadavg()
    print_header(f"decode quality: {os.path.basename(ckpt)}, {args.num_samples} samples/mode, T={T}, "
                 f"temperature {temp}, guidance {G}, {num_classes} classes, features at {args.feature_size} px", env)
    net = _efficientnet()
    ref = features(net, load_test_images(args.num_samples, ref_seed, model.img_size), args.feature_size)
    n, bs = args.num_samples, args.batch_size
    st = os.stat(ckpt)
    labels = torch.arange(n) % num_classes
    classifier = clf_scores = None
    if [c.replace(" ", "_") for c in model_card(ckpt).get("classes", [])] == list(FMNIST_CLASSES):
        classifier, clf_scores = train_classifier()
        print(f"  class agreement: a CNN trained on the real training split, {100 * clf_scores['test_accuracy']:.1f} % "
              f"on the real test split")

    def calls(imgs):
        return predict(classifier, to_classifier_input(imgs)) if classifier is not None else None

    def agreement(pred):
        return agreement_of(pred, labels, num_classes) if pred is not None else None

    def exact(seed):
        def compute():
            imgs, ids, _, speed = run_mode(model, "exact", n, bs, seed, T, temp, num_classes, 0, guidance=G)
            return features(net, imgs, args.feature_size), ids, speed, calls(imgs)
        key = dict(ckpt=os.path.abspath(ckpt), size=st.st_size, mtime_ns=st.st_mtime_ns, num_iter=T, temperature=temp,
                   num_samples=n, classes=num_classes, seed=seed, feature_size=args.feature_size,
                   torch=str(torch.__version__), mage_fast=str(mage_fast.__version__), calls=classifier is not None)
        if G:  # unguided runs keep the keys they were cached under
            key["guidance"] = G
        return exact_run(args.exact_cache, key, compute)
    ex_feat, ex_ids, ex_speed, ex_calls = exact(seeds[0])
    ex_agree = agreement(ex_calls)
    if prior_floor is not None:  # seed 1 from the earlier run; seed 0 must reproduce it
        floor = dict(prior_floor, floor_from=os.path.abspath(args.floor_from))
        again = fd(ex_feat, ref)
        if abs(again - floor["exact_seed0_vs_test"]) > 1e-3 * floor["exact_seed0_vs_test"]:
            raise SystemExit(f"error: --floor-from {args.floor_from}: exact seed {seeds[0]} gives {again:.3f} here "
                             f"against {floor['exact_seed0_vs_test']:.3f} there; not the same work, so not its floor")
        floor["exact_seed0_vs_test_here"] = again
    else:
        ex1_feat, ex1_ids, _, ex1_calls = exact(seeds[1])
        floor = {"exact_seed0_vs_test": fd(ex_feat, ref), "exact_seed1_vs_test": fd(ex1_feat, ref),
                 "exact_seed0_vs_seed1": fd(ex_feat, ex1_feat),
                 "token_diff_seed0_vs_seed1": float((ex_ids != ex1_ids).float().mean())}
        if ex1_calls is not None:
            floor["class_agreement_seed1"] = agreement(ex1_calls)["mean"]
    if ex_agree is not None:
        floor["class_agreement_seed0"] = ex_agree["mean"]
        print(f"  class agreement of exact decoding: seed 0 {ex_agree['mean']:.3f}"
              + (f", seed 1 {floor['class_agreement_seed1']:.3f}" if "class_agreement_seed1" in floor else ""))
    print(f"  noise floor: exact seed 0 {floor['exact_seed0_vs_test']:.2f}, seed 1 {floor['exact_seed1_vs_test']:.2f}, "
          f"seed 0 vs 1 {floor['exact_seed0_vs_seed1']:.2f}; tokens differing between seeds "
          f"{100 * floor['token_diff_seed0_vs_seed1']:.1f} %")
    extra_rows = []
    for s in args.floor_seeds:  # a wider floor: more exact seed sets
        f_s, ids_s, _, _ = exact(s)
        extra_rows.append(dict(mode=f"exact_seed{s}", spec=f"seed {s}", frechet=fd(f_s, ref),
                               frechet_vs_exact=fd(ex_feat, f_s), token_diff=float((ex_ids != ids_s).float().mean()),
                               kl_per_step={}, images_per_s=None, vitb_speedup=None))
        print(f"  noise floor: exact seed {s} {extra_rows[-1]['frechet']:.2f}, seed {seeds[0]} vs {s} "
              f"{extra_rows[-1]['frechet_vs_exact']:.2f}")
    if extra_rows:
        to_test = [floor["exact_seed0_vs_test"], floor["exact_seed1_vs_test"]] + [r["frechet"] for r in extra_rows]
        floor["extra_seeds"] = {r["mode"]: {"vs_test": r["frechet"], "vs_first_seed": r["frechet_vs_exact"]}
                                for r in extra_rows}
        floor["all_seeds_vs_test"] = dict(seeds=seeds + list(args.floor_seeds), min=min(to_test), max=max(to_test),
                                          mean=float(np.mean(to_test)), sd=float(np.std(to_test, ddof=1)))
        floor["first_seed_vs_others_min"] = min([floor["exact_seed0_vs_seed1"]] + [r["frechet_vs_exact"] for r in extra_rows])
        a = floor["all_seeds_vs_test"]
        print(f"  noise floor over {len(to_test)} exact seeds: distance to the test split {a['min']:.2f} .. {a['max']:.2f} "
              f"(mean {a['mean']:.2f}, sd {a['sd']:.2f}); seed {seeds[0]} to the others at least "
              f"{floor['first_seed_vs_others_min']:.2f}")
    speedup = _speedups(args.throughput_json)
    rows = [dict(mode="exact", spec=mode_name(resolve_mode("exact")), frechet=floor["exact_seed0_vs_test"],
                 frechet_vs_exact=0.0, token_diff=0.0, kl_per_step={}, images_per_s=ex_speed,
                 vitb_speedup=speedup.get("exact"), class_agreement=floor.get("class_agreement_seed0"),
                 class_agreement_per_class=ex_agree["per_class"] if ex_agree else None),
            dict(mode="exact_seed1", spec="seed 1", frechet=floor["exact_seed1_vs_test"],
                 frechet_vs_exact=floor["exact_seed0_vs_seed1"], token_diff=floor["token_diff_seed0_vs_seed1"],
                 kl_per_step={}, images_per_s=None, vitb_speedup=None)] + extra_rows
    for name in args.modes:
        imgs, ids, (kl, kl_fixed), speed = run_mode(model, name, n, bs, seeds[0], T, temp, num_classes, args.kl_samples,
                                                          guidance=G)
        feat = features(net, imgs, args.feature_size)
        row = dict(mode=name, spec=mode_name(resolve_mode(name)), frechet=fd(feat, ref), frechet_vs_exact=fd(feat, ex_feat),
                   token_diff=float((ids != ex_ids).float().mean()), kl_per_step=kl,
                   kl_mean=float(np.mean(list(kl.values()))) if kl else 0.0, kl_fixed_per_step=kl_fixed,
                   kl_fixed_mean=float(np.mean(list(kl_fixed.values()))) if kl_fixed else 0.0, images_per_s=speed)
        mode = resolve_mode(name)
        if hasattr(mode, "describe"):  # what the mode computed, whatever its name means later
            row["computes"] = mode.describe()
        row["vitb_speedup"] = _speed_of(row, speedup)
        agree = agreement(calls(imgs))
        if agree is not None:
            row["class_agreement"], row["class_agreement_per_class"] = agree["mean"], agree["per_class"]
        rows.append(row)
        print(f"  {name:<34} Frechet {row['frechet']:7.2f} (vs exact samples {row['frechet_vs_exact']:6.2f}) | "
              f"tokens != exact {100 * row['token_diff']:5.1f} % | mean KL/step {row['kl_mean']:.4f}, "
              f"at fixed tokens {row['kl_fixed_mean']:.4f} | "
              f"{speed or 0:7.1f} images/s here" + (f" | ViT-B {row['vitb_speedup']:.2f}x official" if row["vitb_speedup"] else "")
              + (f" | class agreement {row['class_agreement']:.3f}" if "class_agreement" in row else ""))
    for order, t in step_points:
        imgs, ids, _, speed = run_mode(model, "exact", n, bs, seeds[0], int(t), temp, num_classes, 0, order=order,
                                        guidance=G)
        feat = features(net, imgs, args.feature_size)
        row = dict(mode=f"{order}@T={t}", spec=f"exact pass, order={order}, {t} steps (yardstick: {T})",
                   frechet=fd(feat, ref), frechet_vs_exact=fd(feat, ex_feat), token_diff=None, kl_per_step={},
                   kl_mean=None, images_per_s=speed,
                   vitb_speedup=speedup["exact"] * T / int(t) if speedup.get("exact") else None,
                   vitb_speedup_from_step_count=True)
        rows.append(row)
        print(f"  {row['mode']:<34} Frechet {row['frechet']:7.2f} (vs exact samples {row['frechet_vs_exact']:6.2f}) | "
              f"{speed or 0:7.1f} images/s here")
    env["load_average_at_end"] = os.getloadavg()
    out = {"benchmark": "decode_quality", "yardstick": os.path.abspath(args.yardstick), "seeds": seeds,
           "checkpoint": ckpt, "num_samples": n, "num_iter": T, "temperature": temp, "guidance": G,
           "feature_extractor": f"EfficientNet-Lite0 pooled, bilinear resize to {args.feature_size} px",
           "reference": f"{n} seeded-random Fashion-MNIST test images" + (
               f", padded to {model.img_size} px" if model.img_size != 28 else ""), "noise_floor": floor, "rows": rows,
           "throughput_json": args.throughput_json, "environment": env,
           "classifier": clf_scores}
    path = write_json(out, args.out, result_name("decode_quality", torch.device("cpu"),
                                                 os.path.splitext(os.path.basename(ckpt))[0]))
    print(f"  wrote {path} and {_plot_rows(rows, path, bool(speedup))}")


def _speedups(throughput_json) -> dict:
    """Mode name / spec -> median images/s speed-up against the official path (largest batch); each
    mode's description (what it computes, recorded by decode_throughput.py) maps to it too, so a row
    finds its speed after a preset was renamed or redefined (see :func:`_speed_of`)."""
    if not throughput_json:
        return {}
    with open(throughput_json) as f:
        tj = json.load(f)
    res = tj["results"][max(tj["results"], key=int)]
    cpu = res.get("process_cpu_s")
    if cpu and "official" in cpu:  # process CPU time: less distorted by other jobs than wall time
        out = {k: float(np.median([o / t for o, t in zip(cpu["official"], ts)])) for k, ts in cpu.items()
               if k not in ("official", "vqgan_decode")}
    else:
        out = {k: v["median"] for k, v in res["speedup_images_per_s_vs_official"].items()}
    for name, description in tj.get("modes", {}).items():
        if name in out:
            out.setdefault(("described", description), out[name])
    return out


def _speed_of(row: dict, speedup: dict):
    """A quality row's ViT-B speed-up: by what its spec computes where the throughput run recorded
    that (a preset's name may mean other work in an older run: no match, no speed), else by name or spec."""
    described = any(isinstance(k, tuple) for k in speedup)
    if described and row.get("computes"):  # recorded when the row was measured
        return speedup.get(("described", row["computes"]))
    if described and row.get("spec"):
        try:  # a spec that names no mode ("seed 1", the exact mode's second seed set) falls through
            return speedup.get(("described", resolve_mode(row["spec"]).describe()))
        except ValueError:
            pass
    return speedup.get(row["mode"], speedup.get(row.get("spec")))


def _plot_rows(rows, path, vitb: bool) -> str:
    png = os.path.splitext(path)[0] + ".png"
    if vitb:
        return plot(rows, png, "vitb_speedup", "ViT-B, T=20, batch 4: speed relative to the official path "
                                               "(decode_throughput.py, same run; process CPU time when recorded)")
    return plot(rows, png, "images_per_s", "images/s on this model (this run)")


def replot(path: str, throughput_json) -> None:
    with open(path) as f:
        out = json.load(f)
    speedup = _speedups(throughput_json)
    for r in out["rows"]:
        r["vitb_speedup"] = _speed_of(r, speedup)
    out["throughput_json"] = throughput_json
    write_json(out, path, "")
    print(f"  rewrote {path} and {_plot_rows(out['rows'], path, bool(speedup))}")


def merge(paths, out_path) -> None:
    """Rows of several runs on the same work in one JSON and plot (see ``--merge``)."""
    if not out_path:
        raise SystemExit("error: --merge needs --out (the merged JSON's path)")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --merge {path}: not a readable decode_quality JSON ({e})") from None
        if runs[-1].get("benchmark") != "decode_quality":
            raise SystemExit(f"error: --merge {path}: not a decode_quality JSON")
    same = ("checkpoint", "num_samples", "num_iter", "temperature", "guidance", "feature_extractor", "reference",
            "seeds")
    for path, r in zip(paths[1:], runs[1:]):
        diff = [k for k in same if None not in (r.get(k), runs[0].get(k)) and r[k] != runs[0][k]]  # absent: unknown
        if diff:
            raise SystemExit(f"error: --merge {path}: other work than {paths[0]} ({', '.join(diff)} differ)")
    widest = max(runs, key=lambda r: len(r["noise_floor"].get("all_seeds_vs_test", {}).get("seeds", [0, 1])))
    rows, seen = [], set()
    for r in runs:
        for row in r["rows"]:
            if row["mode"] not in seen:
                seen.add(row["mode"])
                rows.append(row)
    out = {k: next((r[k] for r in runs if r.get(k) is not None), None)
           for k in ("benchmark", "yardstick", "seeds", "checkpoint", "num_samples", "num_iter", "temperature",
                     "guidance", "feature_extractor", "reference")}
    out.update(noise_floor=widest["noise_floor"], rows=rows, merged_from=[os.path.basename(p) for p in paths],
               environment=runs[0].get("environment"))
    path = write_json(out, out_path, "")
    vitb = any(r.get("vitb_speedup") for r in rows)
    print(f"  merged {len(rows)} rows from {len(paths)} runs into {path} and {_plot_rows(rows, path, vitb)}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
