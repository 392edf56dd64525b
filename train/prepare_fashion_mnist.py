"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``) -> ImageFolder of PNGs, offline.

    apt-get install -y dataset-fashion-mnist
    python train/prepare_fashion_mnist.py --out data/fmnist          # -> data/fmnist/{train,test}/<class>/*.png
    python train/prepare_fashion_mnist.py --out data/fmnist32 --pad_to 32   # 32x32: 2 black pixels each side

Images stay 28x28 grayscale PNGs (or are padded with the black background to ``--pad_to``, so a
tokenizer with downsampling 2 gives 16x16 tokens with no resampling of the garments); the loaders
convert them to RGB and resize to the model size.
"""
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.data.idx import read_idx  # noqa: E402

CLASSES = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
           "8_bag", "9_ankle_boot"]
DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"


def pad_images(imgs: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size), the images centred on a zero (black, the Fashion-MNIST
    background) border; an odd margin puts the extra pixel at the bottom / right."""
    n, h, w = imgs.shape
    if size < h or size < w:
        raise ValueError(f"--pad_to {size} is smaller than the {h}x{w} images")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), dtype=imgs.dtype)
    out[:, top:top + h, left:left + w] = imgs
    return out


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    ap.add_argument("--src", default=DEFAULT_SRC, help="folder with the idx .gz files")
    ap.add_argument("--out", required=True, help="output root; writes train/ and test/ ImageFolders")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per split (0: all)")
    ap.add_argument("--pad_to", type=int, default=0, help="pad the 28x28 images with black to this side (0: keep 28)")
    args = ap.parse_args(argv)
    if args.pad_to and args.pad_to < 28:
        ap.error(f"--pad_to {args.pad_to} is smaller than the 28x28 images")
    if not os.path.isdir(args.src):
        sys.exit(f"{args.src} not found: install it with `apt-get install -y dataset-fashion-mnist` or pass --src")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs = read_idx(os.path.join(args.src, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.src, f"{prefix}-labels-idx1-ubyte.gz"))
        if len(imgs) != len(labels):
            sys.exit(f"{split}: {len(imgs)} images but {len(labels)} labels")
        if args.pad_to:
            imgs = pad_images(imgs, args.pad_to)
        n = len(imgs) if args.limit <= 0 else min(args.limit, len(imgs))
        for c in CLASSES:
            os.makedirs(os.path.join(args.out, split, c), exist_ok=True)
        for i in tqdm(range(n), desc=f"fashion-mnist {split}", unit="img", mininterval=1.0):
            Image.fromarray(imgs[i], mode="L").save(os.path.join(args.out, split, CLASSES[labels[i]], f"{i:05d}.png"))
    print(f"wrote {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
