"""Measure a trained tokenizer / MAGE: reconstruction error, linear probe, and a sample grid.

    python train/evaluate.py recon  --tokenizer out/tok/tokenizer.pt --data_path data/fmnist/test --img_size 28
    python train/evaluate.py probe  --ckpt out/mage.pt --train_cache train_tok.pt --test_cache test_tok.pt
    python train/evaluate.py probe  --ckpt out/mage.pt --train_cache train_tok.pt --test_cache test_tok.pt --block 2
    python train/evaluate.py pixels --train_path data/fmnist/train --test_path data/fmnist/test --img_size 28
    python train/evaluate.py token_pixels --ckpt out/mage.pt --train_cache train_tok.pt --test_cache test_tok.pt \
        --train_limit 10000      # against: pixels ... --train_limit 10000 (the same 10 000 images)
    python train/evaluate.py samples --ckpt out/mage.pt --out grid.png --n 64 --num_iter 12 --temperature 4.5
    python train/evaluate.py vim_probe --ckpt out/vim/vim.pt --train_cache train_tok.pt --test_cache test_tok.pt \
        --layer 3
    python train/evaluate.py vim_samples --ckpt out/vim/vim.pt --out vim_grid.png --n 64 --temperature 1.0 \
        --top_k 100 --png_dir out/vim/samples     # then: python -m mage_fast fid out/vim/samples REF_DIR

``recon`` takes either tokenizer (a VQGAN or ViT-VQGAN export). ``vim_probe`` uses VIM's probe
features (block ``--layer``'s output averaged over the image tokens, a parameter-free LayerNorm)
with the same standardise + logistic-regression protocol as ``probe``. ``vim_samples`` draws
class-balanced samples (label i mod num_classes; ``--class_id`` for one class, -1 for
unconditional) with the KV-cached sampler. ``probe --block N`` reads the encoder after block N.
``token_pixels`` fits the raw-pixel baseline on the tokenizer's reconstructions of the cached
tokens: compared with ``pixels`` on the same ``--train_limit`` subset, it shows how much of what
the regression uses survives tokenization.

Linear probe (official feature protocol): the encoder on all tokens (no mask), no final norm, the
mean over the image tokens, a parameter-free LayerNorm; then features are standardised with the
training statistics (BatchNorm without affine, as the official head) and a multinomial logistic
regression is fitted with L-BFGS; its L2 strength is chosen on a seeded random 10% of the training split
and the chosen model is refitted on the whole training split. Accuracy is on the test split.
"""
import json
import os
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.eval.recognition import fit_logistic_regression  # noqa: E402
from mage_fast.images import save_grid  # noqa: E402
from mage_fast.models.checkpoint import build_from_checkpoint, tokenizer_checksum  # noqa: E402
from mage_fast.training.common import check_token_cache  # noqa: E402


def _load_cache(path):
    from mage_fast.data.datasets import read_token_cache
    blob = read_token_cache(path)  # InputError, one line naming the file, for one that is not a whole cache
    return blob["ids"][:, 0].long(), blob["labels"].long(), blob.get("meta", {})


@torch.no_grad()
def batched_features(fn, ids: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``fn(ids chunk) -> features`` over ``ids`` in chunks of ``batch``, concatenated."""
    return torch.cat([fn(ids[i:i + batch]) for i in tqdm(range(0, len(ids), batch), desc="features", unit="batch",
                                                         mininterval=2.0)])


def encoder_block(model, block: int = None) -> int:
    """``block`` checked against the encoder's depth (None: the last block)."""
    depth = len(model.blocks)
    block = depth if block is None else block
    if not 1 <= block <= depth:
        raise ValueError(f"block must be in [1, {depth}], got {block}")
    return block


@torch.no_grad()
def mage_features(model, ids: torch.Tensor, batch: int = 500, block: int = None) -> torch.Tensor:
    """The official probe features (all tokens, no mask, no final norm, mean over the image tokens,
    parameter-free LayerNorm), read after encoder block ``block`` (1..depth; default: the last)."""
    model.eval()
    block = encoder_block(model, block)

    def fn(chunk):
        h = model.token_emb(model._with_class_slot(chunk, model.fake_class_label))
        for blk in model.blocks[:block]:
            h = blk(h)
        h = h[:, 1:].mean(dim=1)
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)
    return batched_features(fn, ids, batch)


@torch.no_grad()
def token_pixel_features(model, ids: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """What the raw-pixel baseline reads (channel 0, flattened), taken from the tokenizer's
    reconstruction of each token grid (clamped to [0, 1]) instead of the image."""
    g = model.token_grid
    return batched_features(lambda c: model.vqgan.decode_code(c.view(-1, g, g))[:, 0].clamp(0, 1).flatten(1), ids,
                            batch)


def subset(n: int, limit: int = 0) -> torch.Tensor:
    """The first ``limit`` of a permutation of range(n) seeded with 0 (all of range(n) when 0), so
    two commands given the same ``limit`` use the same training images."""
    if not limit or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


@torch.no_grad()
def vim_features(model, ids: torch.Tensor, layer: int, batch: int = 500) -> torch.Tensor:
    """VIM probe features (``VIM.probe_features``: block ``layer``, mean over image tokens, LayerNorm)."""
    model.eval()
    return batched_features(lambda chunk: model.probe_features(chunk, layer), ids, batch)


def probe_from_caches(features, train_cache: str, test_cache: str, train_limit: int = 0,
                      fewshot: Sequence[int] = ()) -> dict:
    """The linear-probe protocol on view 0 of two token caches, with ``features(ids) -> (N, D)``
    (on ``subset(N, train_limit)`` of the training cache); with ``fewshot`` also k-shot accuracy
    (:func:`mage_fast.eval.few_shot`: k images per class, 5 seeds) on the same features."""
    ids_tr, y_tr, _ = _load_cache(train_cache)
    ids_te, y_te, _ = _load_cache(test_cache)
    keep = subset(len(ids_tr), train_limit)
    ids_tr, y_tr = ids_tr[keep], y_tr[keep]
    f_tr, f_te = features(ids_tr), features(ids_te)
    res = linear_probe(f_tr, y_tr, f_te, y_te)
    if fewshot:
        from mage_fast.eval import few_shot
        res["few_shot"] = {str(k): v for k, v in few_shot(f_tr, y_tr, f_te, y_te, shots=fewshot).items()}
    return res


def linear_probe(xtr, ytr, xte, yte, wds=(1e-6, 1e-5, 1e-4, 1e-3)) -> dict:
    """Standardise with training stats, pick the L2 strength on a 10% hold-out, refit, test."""
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    k = int(max(ytr.max(), yte.max())) + 1
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))  # folders are class-sorted
    fit_i, val_i = perm[len(xtr) // 10:], perm[: len(xtr) // 10]
    val = {}
    for wd in wds:
        w, b = fit_logistic_regression(xtr[fit_i], ytr[fit_i], k, wd, history_size=20)
        val[wd] = float(((xtr[val_i] @ w + b).argmax(1) == ytr[val_i]).float().mean())
    best = max(val, key=val.get)
    w, b = fit_logistic_regression(xtr, ytr, k, best, history_size=20)
    acc = float(((xte @ w + b).argmax(1) == yte).float().mean())
    return {"test_accuracy": acc, "l2": best, "holdout_accuracy": val, "train_n": len(xtr), "test_n": len(xte),
            "dim": xtr.shape[1]}


def _folder_tensor(path, img_size):
    from mage_fast.data import eval_images
    ds = eval_images(path, img_size)
    dl = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=1)
    xs, ys = [], []
    for x, y in tqdm(dl, desc=os.path.basename(path.rstrip("/")), unit="batch", mininterval=2.0):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recon", help="tokenizer reconstruction error on a folder")
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--data_path", required=True)
    r.add_argument("--img_size", type=int, required=True)
    r.add_argument("--png", default=None, help="write originals over reconstructions here")
    r.add_argument("--png_per_class", type=int, default=0,
                   help="the picture shows this many images of every class instead of the first 32: one column "
                        "per class, each original above its reconstruction")
    r.add_argument("--center_crop", type=int, default=0,
                   help="score only the central NxN pixels (28 for Fashion-MNIST padded to 32: the padding is "
                        "easy and would flatter the PSNR); 0: the whole image")
    p = sub.add_parser("probe", help="linear probe on MAGE features from token caches (view 0)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--train_cache", required=True)
    p.add_argument("--test_cache", required=True)
    p.add_argument("--block", type=int, default=None, help="read the encoder after this block (default: the last)")
    p.add_argument("--fewshot", type=int, nargs="*", default=[], metavar="K",
                   help="also k-shot accuracy on the same features for each K (images per class, 5 seeds)")
    tp = sub.add_parser("token_pixels", help="the raw-pixel baseline on the tokenizer's reconstructions of the "
                                             "cached tokens: how much of what the regression uses the tokens keep")
    tp.add_argument("--ckpt", required=True, help="a MAGE checkpoint (its tokenizer decodes the tokens)")
    tp.add_argument("--train_cache", required=True)
    tp.add_argument("--test_cache", required=True)
    x = sub.add_parser("pixels", help="the raw-pixel logistic-regression baseline")
    x.add_argument("--train_path", required=True)
    x.add_argument("--test_path", required=True)
    x.add_argument("--img_size", type=int, default=28)
    for q in (p, tp, x):
        q.add_argument("--train_limit", type=int, default=0,
                       help="fit on this many training images (a seeded subset, the same one in every command: a "
                            "token cache lists the images in folder order); 0: all")
    s = sub.add_parser("samples", help="generate a PNG grid")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--num_iter", type=int, default=12)
    s.add_argument("--temperature", type=float, default=4.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=3, help="pixel upscaling of the grid")
    v = sub.add_parser("vim_probe", help="linear probe on VIM features (block --layer) from token caches (view 0)")
    v.add_argument("--ckpt", required=True, help="train_vim.py export")
    v.add_argument("--train_cache", required=True)
    v.add_argument("--test_cache", required=True)
    v.add_argument("--layer", type=int, default=None, help="block 1..depth (default: depth // 2)")
    vs = sub.add_parser("vim_samples", help="VIM samples: a PNG grid, optionally every image as a PNG")
    vs.add_argument("--ckpt", required=True, help="train_vim.py export")
    vs.add_argument("--out", required=True, help="grid PNG")
    vs.add_argument("--n", type=int, default=64)
    vs.add_argument("--temperature", type=float, default=1.0)
    vs.add_argument("--top_k", type=int, default=None)
    vs.add_argument("--top_p", type=float, default=None)
    vs.add_argument("--class_id", type=int, default=None,
                    help="one class for all (-1: unconditional); default class-balanced, label i mod num_classes")
    vs.add_argument("--batch_size", type=int, default=100)
    vs.add_argument("--seed", type=int, default=0)
    vs.add_argument("--grid", type=int, default=64, help="images in the grid")
    vs.add_argument("--scale", type=int, default=3, help="pixel upscaling of the grid")
    vs.add_argument("--png_dir", default=None, help="write every image as DIR/00000.png ... (for the Frechet "
                                                     "distance: python -m mage_fast fid DIR REF_DIR)")
    ap.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    args = ap.parse_args(argv)

    if args.cmd == "recon":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from cache_tokens import load_tokenizer
        if not 0 <= args.center_crop <= args.img_size:
            raise SystemExit(f"error: --center_crop must be in [0, --img_size {args.img_size}], got {args.center_crop}")
        if args.png_per_class < 0:
            raise SystemExit(f"error: --png_per_class must be >= 0, got {args.png_per_class}")
        vq = load_tokenizer(args.tokenizer, args.img_size)
        xs, ys = _folder_tensor(args.data_path, args.img_size)
        c = args.center_crop or args.img_size
        lo = (args.img_size - c) // 2
        se, ae, n, used = 0.0, 0.0, 0, torch.zeros(vq.n_embed, dtype=torch.bool)
        max_channel_gap = 0.0
        with torch.inference_mode():
            for i in range(0, len(xs), 500):
                z_q, _, (_, _, idx) = vq.encode(xs[i:i + 500])
                rec = vq.decode(z_q).clamp(0, 1)
                max_channel_gap = max(max_channel_gap, float((rec.amax(1) - rec.amin(1)).max()))
                d = (rec - xs[i:i + 500])[:, :, lo:lo + c, lo:lo + c]
                se += float((d ** 2).sum())
                ae += float(d.abs().sum())
                n += d.numel()
                used[idx] = True
                if i == 0 and args.png and not args.png_per_class:
                    write_grid(torch.cat([xs[:32], rec[:32]]), args.png, 3)
            if args.png and args.png_per_class:
                write_grid(class_pairs(vq, xs, ys, args.png_per_class), args.png, 3, cols=int(ys.max()) + 1)
        mse = se / n
        res = {"what": "tokenizer reconstruction", "images": len(xs), "scored_pixels": f"central {c}x{c}",
               "mse": mse, "mae": ae / n, "psnr_db": float(10 * torch.log10(torch.tensor(1.0 / mse))),
               "max_channel_gap": max_channel_gap, "codes_used": int(used.sum()), "codebook": vq.n_embed}
    elif args.cmd == "probe":
        if any(k < 1 for k in args.fewshot):
            raise SystemExit(f"error: --fewshot takes images per class >= 1, got {args.fewshot}")
        model = build_from_checkpoint(args.ckpt)
        try:
            block = encoder_block(model, args.block)
        except ValueError as e:
            raise SystemExit(f"error: --{e}")
        res = {"what": "MAGE linear probe", "ckpt": args.ckpt, "block": block,
               **probe_from_caches(lambda ids: mage_features(model, ids, block=block), args.train_cache,
                                   args.test_cache, args.train_limit, args.fewshot)}
    elif args.cmd == "token_pixels":
        model = build_from_checkpoint(args.ckpt).eval()
        res = {"what": "raw-pixel linear probe on the tokenizer's reconstructions", "ckpt": args.ckpt,
               **probe_from_caches(lambda ids: token_pixel_features(model, ids), args.train_cache, args.test_cache,
                                   args.train_limit)}
    elif args.cmd == "vim_probe":
        model = _load_vim(args.ckpt)
        layer = args.layer if args.layer is not None else max(1, model.depth // 2)
        if not 1 <= layer <= model.depth:
            raise SystemExit(f"error: --layer must be in [1, {model.depth}], got {layer}")
        for cache in (args.train_cache, args.test_cache):
            check_token_cache(cache, model.seq_len, model.codebook_size, tokenizer_checksum(model.tokenizer))
        res = {"what": "VIM linear probe", "ckpt": args.ckpt, "layer": layer, "depth": model.depth,
               **probe_from_caches(lambda ids: vim_features(model, ids, layer), args.train_cache, args.test_cache)}
    elif args.cmd == "vim_samples":
        res = vim_samples(args)
    elif args.cmd == "pixels":
        xtr, ytr = _folder_tensor(args.train_path, args.img_size)
        keep = subset(len(xtr), args.train_limit)
        xtr, ytr = xtr[keep], ytr[keep]
        xte, yte = _folder_tensor(args.test_path, args.img_size)
        res = {"what": "raw-pixel linear probe", **linear_probe(xtr[:, 0].flatten(1), ytr, xte[:, 0].flatten(1), yte)}
    else:
        model = build_from_checkpoint(args.ckpt).eval()
        from mage_fast import generate
        imgs = generate(model, args.n, num_iter=args.num_iter, temperature=args.temperature, seed=args.seed,
                        progress=True).clamp(0, 1)
        write_grid(imgs, args.out, args.scale)
        res = {"what": "samples", "png": args.out, "n": args.n, "num_iter": args.num_iter,
               "temperature": args.temperature, "seed": args.seed}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


def _load_vim(path):
    from mage_fast.models.checkpoint import CheckpointError, load_vim
    try:
        return load_vim(path).eval()
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: --ckpt {path}: {e}")


def vim_samples(args) -> dict:
    """Sample ``args.n`` images from a VIM export in batches (image i keyed by (seed, i), so the
    images do not depend on the batch size); grid PNG, and every image under ``--png_dir``."""
    from mage_fast.images import save_pngs
    from mage_fast.vim_sampling import generate
    model = _load_vim(args.ckpt)
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("error: --n and --batch_size must be >= 1")
    if args.class_id is not None and not -1 <= args.class_id < model.num_classes:
        raise SystemExit(f"error: --class_id must be -1 or in [0, {model.num_classes}), got {args.class_id}")
    grid = []
    for start in tqdm(range(0, args.n, args.batch_size), desc="sampling", unit="batch", mininterval=2.0):
        b = min(args.batch_size, args.n - start)
        if args.class_id is not None:
            labels = torch.full((b,), args.class_id)
        elif model.num_classes > 0:
            labels = torch.arange(start, start + b) % model.num_classes
        else:
            labels = None
        imgs = generate(model, b, labels=labels, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, first_index=start).clamp(0, 1)
        if args.png_dir:
            save_pngs(imgs, args.png_dir, first_index=start)
        grid.append(imgs[: max(0, args.grid - sum(len(g) for g in grid))])
    write_grid(torch.cat(grid), args.out, args.scale)
    return {"what": "VIM samples", "ckpt": args.ckpt, "png": args.out, "png_dir": args.png_dir, "n": args.n,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "class_id": args.class_id,
            "seed": args.seed}


def class_pairs(vq, xs: torch.Tensor, ys: torch.Tensor, k: int) -> torch.Tensor:
    """Rows for a picture with one column per class: the first ``k`` images of every class, each
    original row followed by its reconstruction row -> (2 k C, 3, H, W)."""
    classes = int(ys.max()) + 1
    picks = []
    for c in range(classes):
        idx = (ys == c).nonzero().flatten()[:k]
        if len(idx) < k:
            raise SystemExit(f"error: class {c} has {len(idx)} images, --png_per_class asks for {k}")
        picks.append(idx)
    rows = []
    with torch.inference_mode():
        for j in range(k):
            orig = xs[torch.stack([p[j] for p in picks])]
            rows += [orig, vq.decode(vq.encode(orig)[0]).clamp(0, 1)]
    return torch.cat(rows)


def write_grid(imgs: torch.Tensor, path: str, scale: int = 1, cols: int = None) -> None:
    """(N, 3, H, W) in [0, 1] -> a PNG grid (square, or ``cols`` wide) with 2-pixel gaps, the whole
    picture enlarged ``scale`` times, by the project's one grid writer :func:`mage_fast.images.save_grid`
    (pixels rounded to 8 bits)."""
    tiles = (imgs.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    save_grid(list(tiles), path, ncol=cols, min_tile=0, scale=scale)


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
