"""Tokenize an ImageFolder once into several augmented views per image, for token-cache training.

    python train/cache_tokens.py --data_path data/fmnist/train --tokenizer out/tok/tokenizer.pt \
        --img_size 28 --views 4 --plain_first --out out/fmnist_train_tokens.pt
    deepspeed train/pretrain.py ... --token_cache out/fmnist_train_tokens.pt --tokenizer out/tok/tokenizer.pt
    deepspeed train/train_vim.py ... --token_cache out/fmnist_vit_train_tokens.pt --tokenizer out/vit_tok/tokenizer.pt

Either tokenizer works: a VQGAN or ViT-VQGAN export of train/train_tokenizer.py (a ViT-VQGAN's
``--img_size`` must be the one it was trained at), or a MAGE / VIM checkpoint's tokenizer.

The frozen tokenizer dominates a small model's training step; caching V views trades it for a
fixed set of augmentations (each epoch picks one view per image at random). With ``--plain_first``
view 0 is the un-augmented image (resize only), which evaluation (linear probe) reuses.
Writes ``{'ids': (N, V, L) int16, 'labels': (N,), 'meta': {...}}``.
"""
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.data import EvalTransform, ImageFolder, TrainTransform  # noqa: E402
from mage_fast.models.checkpoint import CheckpointError, build_tokenizer, tokenizer_checksum  # noqa: E402


def load_tokenizer(path: str, img_size: int):
    """Either tokenizer (VQGAN or ViT-VQGAN export, a MAGE or VIM checkpoint), frozen, eval mode."""
    try:
        return build_tokenizer(path, img_size)
    except CheckpointError as e:
        raise SystemExit(f"error: --tokenizer {path}: {e}")


class _Views(torch.utils.data.Dataset):
    def __init__(self, train: ImageFolder, plain: ImageFolder, views: int, plain_first: bool):
        self.train, self.plain, self.views, self.plain_first = train, plain, views, plain_first

    def __len__(self):
        return len(self.train)

    def __getitem__(self, i):
        xs = [self.plain[i][0] if (v == 0 and self.plain_first) else self.train[(0, i, v)][0] for v in range(self.views)]
        return torch.stack(xs), self.train.samples[i][1]


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    ap.add_argument("--data_path", required=True)
    ap.add_argument("--tokenizer", required=True, help="train_tokenizer.py export (VQGAN or ViT-VQGAN) or a "
                                                       "MAGE / VIM checkpoint")
    ap.add_argument("--img_size", type=int, required=True)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--plain_first", action="store_true", help="view 0 is the un-augmented image")
    ap.add_argument("--crop_scale_min", type=float, default=0.2)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--num_workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for flag, v, lo in (("--views", args.views, 1), ("--img_size", args.img_size, 1),
                        ("--batch_size", args.batch_size, 1), ("--num_workers", args.num_workers, 0)):
        if v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    if not 0 < args.crop_scale_min <= 1:
        ap.error(f"--crop_scale_min must be in (0, 1], got {args.crop_scale_min}")
    from mage_fast.models.checks import InputError
    from mage_fast.runs import check_output_file
    from mage_fast.training.common import check_image_folder
    check_output_file(args.out)  # before the tokenizing, not after it
    check_image_folder(args.data_path)
    vq = load_tokenizer(args.tokenizer, args.img_size)
    if args.img_size % vq.downsample:
        raise InputError(f"--img_size {args.img_size} is not a multiple of the tokenizer's downsampling "
                         f"{vq.downsample}")
    vq.check_input_range = False
    train = ImageFolder(args.data_path, TrainTransform(args.img_size, (args.crop_scale_min, 1.0)), seed=args.seed)
    plain = ImageFolder(args.data_path, EvalTransform(args.img_size))
    ds = _Views(train, plain, args.views, args.plain_first)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    grid = args.img_size // vq.downsample
    ids = torch.empty(len(ds), args.views, grid * grid, dtype=torch.int16 if vq.n_embed <= 32767 else torch.int32)
    labels = torch.empty(len(ds), dtype=torch.long)
    n = 0
    with torch.inference_mode():
        for x, y in tqdm(dl, desc="tokenizing", unit="batch", mininterval=2.0):
            B = x.shape[0]
            _, _, (_, _, idx) = vq.encode(x.flatten(0, 1))
            ids[n:n + B] = idx.view(B, args.views, -1).to(ids.dtype)
            labels[n:n + B] = y
            n += B
    meta = dict(seq_len=grid * grid, n_embed=vq.n_embed, img_size=args.img_size, views=args.views,
                plain_first=args.plain_first, crop_scale_min=args.crop_scale_min, classes=train.classes,
                tokenizer=os.path.abspath(args.tokenizer), seed=args.seed,
                arch="vit_vqgan" if hasattr(vq, "quant_proj") else "vqgan", codebook_checksum=tokenizer_checksum(vq))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from mage_fast.runs import atomic_path
    with atomic_path(args.out) as tmp:  # a cache cut short by a kill is never left under its name
        torch.save({"ids": ids, "labels": labels, "meta": meta}, tmp)
    used = torch.unique(ids.long()).numel()
    print(f"wrote {args.out}: {tuple(ids.shape)} ids, {used}/{vq.n_embed} codes used")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
