"""Command line: ``python -m mage_fast {generate,info}``."""
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


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    import mage_fast
    from mage_fast.images import save_grid, save_pngs, to_uint8

    if args.num_images < 1 or args.batch_size < 1:
        raise SystemExit("error: --num-images and --batch-size must be >= 1")
    dev = _device(args.device)
    try:
        model, ckpt = load_model(args.ckpt, args.model)
    except mage_fast.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    model = model.to(dev).eval()
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
        imgs = mage_fast.generate(model, args.batch_size if args.rng == "official" else n, num_iter=args.num_iter,
                                  temperature=args.temperature, seed=seed, rng=args.rng, first_index=start)[:n]
        save_pngs(imgs, args.out, first_index=start)
        grid_imgs.extend(to_uint8(imgs)[: max(0, args.grid - len(grid_imgs))])
    grid = save_grid(grid_imgs, os.path.join(args.out, "grid.png"))
    dt = time.perf_counter() - t0
    print(f"wrote {args.num_images} PNGs and {grid} in {dt:.1f} s ({args.num_images / dt:.2f} images/s)")
    return 0


def cmd_info(_args) -> int:
    from mage_fast.info import report
    print(report())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mage_fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="unconditional generation to PNG files plus grid.png")
    g.add_argument("--ckpt", default=None, help="checkpoint ({'model': sd} official or mage_fast); "
                                               "default: the shipped small model")
    g.add_argument("--model", default=None, help="vit_base | vit_large | tiny (default: inferred from the checkpoint)")
    g.add_argument("--num-images", type=int, default=16)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--num-iter", type=int, default=20, help="decoding steps (README setting 20)")
    g.add_argument("--temperature", type=float, default=6.0, help="confidence-noise temperature (README 6.0)")
    g.add_argument("--seed", type=int, default=0, help="rng=official: batch b uses seed + b, as the official script")
    g.add_argument("--rng", choices=("official", "torch"), default="official")
    g.add_argument("--device", default="auto")
    g.add_argument("--grid", type=int, default=64, help="how many images go into grid.png")
    g.add_argument("--out", default="outputs/generate")
    g.set_defaults(fn=cmd_generate)
    i = sub.add_parser("info", help="versions, device and the backend each op uses")
    i.set_defaults(fn=cmd_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
