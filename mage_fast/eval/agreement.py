"""Class agreement: does a class-conditional model draw the class it is asked for?

A small CNN is trained on the real Fashion-MNIST training split (Debian's ``dataset-fashion-mnist``,
read offline) and scored on the real test split. Class-conditional samples are then given to it:
the share of class c's samples that it calls c is class c's agreement. Its own real-test accuracy
is the ceiling to read the agreement against. The classifier is trained once per machine and kept
in a cache file named by everything that decides its weights.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.idx import read_idx

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot")
_VERSION = 2  # bump when the network or its training changes: names a new cache file


class FashionCNN(nn.Module):
    """Four 3x3 convolutions (32, 32, 64, 64 channels, two max-pools), a 256-wide hidden layer:
    (B, 1, 28, 28) in [0, 1] -> (B, 10) logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.features = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64),
                                      nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 256), nn.ReLU(inplace=True),
                                  nn.Dropout(0.3), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.286) / 0.353))


def load_split(split: str, root: str = FMNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """('train' | 'test') -> (images (N, 1, 28, 28) float in [0, 1], labels (N,) int64)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    imgs = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    return torch.from_numpy(imgs.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(labels.astype("int64"))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Generated images (B, 3, S, S) as the PNGs hold them (clamped to [0, 1], rounded to 8 bits),
    grey (channel mean), centre 28x28 (the 32-px model's padding cut off; other sizes resized)."""
    x = images.float().clamp(0, 1).mul(255).round().div(255).mean(dim=1, keepdim=True)
    s = x.shape[-1]
    if s >= 28 and s - 28 <= 4:
        o = (s - 28) // 2
        return x[..., o:o + 28, o:o + 28]
    return F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero fill) and horizontal flips."""
    B = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    x = pad[..., dy:dy + 28, dx:dx + 28]
    flip = torch.rand(B, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> list[float]:
    return [float((pred[labels == c] == c).float().mean()) for c in range(num_classes)]


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    bs = 128
    steps = epochs * (len(x) // bs)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="Fashion-MNIST classifier", leave=False)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(net(_augment(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()


def train_classifier(epochs: int = 4, seed: int = 0, root: str = FMNIST_DIR, limit: Optional[int] = None,
                     cache_dir: Optional[str] = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """The classifier and its real-test scores ({'test_accuracy', 'test_per_class', ...}), from the
    cache when it holds this (version, epochs, seed, limit, data) else trained (Adam, batch 128,
    one-cycle lr, shifts and flips) and cached. ``limit`` trains on the first ``limit`` images."""
    files = [os.path.join(root, f) for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
    data_key = "-".join(str(os.path.getsize(f)) for f in files if os.path.isfile(f))
    key = hashlib.sha256(f"{_VERSION}|{epochs}|{seed}|{limit}|{data_key}".encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "mage_fast")
    path = os.path.join(cache_dir, f"fmnist_classifier_{key}.pt")
    with torch.random.fork_rng(devices=[]):  # the weights depend on `seed` alone, never on the caller's RNG
        torch.manual_seed(seed)
        net = FashionCNN()
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["state_dict"])
            return net.eval(), saved["scores"]
        except Exception:  # unreadable (e.g. a kill mid-write elsewhere): train again and replace it
            pass
    x, y = load_split("train", root)
    if limit:
        x, y = x[:limit], y[:limit]
    tx, ty = load_split("test", root)
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: seeded here, restored after
        torch.manual_seed(seed)
        _fit(net, x, y, epochs, seed, progress)
    pred = predict(net, tx)
    scores = {"test_accuracy": float((pred == ty).float().mean()), "test_per_class": per_class_accuracy(pred, ty),
              "epochs": epochs, "seed": seed, "train_images": len(x), "classes": list(FMNIST_CLASSES)}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state_dict": net.state_dict(), "scores": scores}, tmp)
    os.replace(tmp, path)
    return net.eval(), scores


@torch.no_grad()
def sample_agreement(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int = 10) -> dict:
    """Agreement of generated ``images`` (B, 3, S, S) drawn for ``labels`` (B,): per class and mean,
    and the confusion counts (rows: asked-for class, columns: the classifier's call)."""
    return agreement_of(predict(classifier, to_classifier_input(images)), labels, num_classes)


def agreement_of(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> dict:
    """:func:`sample_agreement` from the classifier's calls ``pred`` (B,) for ``labels`` (B,)."""
    per = per_class_accuracy(pred, labels, num_classes)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return {"per_class": per, "mean": sum(per) / len(per), "confusion": conf.tolist()}


def agreement_summary(result: dict, scores: dict, names: Sequence[str] = FMNIST_CLASSES) -> list[str]:
    """Printable lines: each class's agreement beside the classifier's real-test accuracy for it."""
    lines = [f"  {'class':12s} {'agreement':>9s} {'classifier on real test':>24s}"]
    for n, a, r in zip(names, result["per_class"], scores["test_per_class"]):
        lines.append(f"  {n:12s} {a:9.3f} {r:24.3f}")
    lines.append(f"  {'mean':12s} {result['mean']:9.3f} {scores['test_accuracy']:24.3f}   "
                 f"(agreement / accuracy {result['mean'] / scores['test_accuracy']:.3f})")
    return lines
