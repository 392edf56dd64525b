"""Recognition with frozen MAGE features: the official linear probe, few-shot logistic regression,
and the parameter groups of fine-tuning with layer-wise learning-rate decay."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..image_folder import list_image_folder
from .folder import iterate_images


@torch.no_grad()
def extract_features(model, root, batch_size: int = 64, cache: Optional[str] = None,
                     progress: bool = True, classes: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Official probe features (``MAGE.probe_features``: all tokens, no mask, no final norm, mean over
    image tokens, identity LayerNorm) for every image of an ImageFolder ``root`` (or of a list of
    ``(path, label)`` items with their ``classes``). Cached to ``cache``: the caller names the file
    by everything that determines the features (the CLI hashes the checkpoint and the files)."""
    if cache and os.path.isfile(cache):
        d = torch.load(cache, weights_only=True)
        return d["features"], d["labels"], list(d["classes"])
    if isinstance(root, (str, os.PathLike)):
        items, classes = list_image_folder(root)
        name = os.path.basename(os.fspath(root))
    else:
        items, classes, name = list(root), list(classes or []), "images"
    dev = next(model.parameters()).device
    feats, labels = [], []
    batches = iterate_images(items, model.img_size, batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=math.ceil(len(items) / batch_size), desc=f"features {name}")
    for x, y in batches:
        feats.append(model.probe_features(x.to(dev)).float().cpu())
        labels.append(y)
    out = torch.cat(feats), torch.cat(labels), classes
    if cache:
        from ..runs import atomic_path
        with atomic_path(cache) as tmp:
            torch.save({"features": out[0], "labels": out[1], "classes": classes}, tmp)
    return out


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (SGD with momentum and a per-tensor trust ratio), as the
    official MAE/MAGE linear probe uses; 1-D tensors (biases, norms) skip decay and scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(d)
                    q = torch.where((pn > 0) & (un > 0), g["trust_coefficient"] * pn / un, torch.ones_like(pn))
                    d = d.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def probe_head(dim: int, num_classes: int) -> nn.Module:
    """The official probe head: BatchNorm1d without affine (eps 1e-6), then a linear layer
    (weights trunc-normal std 0.01, bias 0)."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), head)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 epochs: int = 90, batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0,
                 warmup_epochs: int = 10, seed: int = 0) -> dict:
    """Train the official head with LARS (lr = blr * batch / 256, warm-up then half-cycle cosine)
    on cached features; returns top-1 accuracy on the test features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, dim = train_x.shape
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = probe_head(dim, num_classes)
    lr = blr * batch_size / 256
    opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    it = 0
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i: i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs 2 samples
            cur = lr * it / max(1, warm) if it < warm else \
                lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, total - warm)))
            for grp in opt.param_groups:
                grp["lr"] = cur
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
    head.eval()
    with torch.no_grad():
        acc = (head(test_x).argmax(1) == test_y).float().mean().item()
        train_acc = (head(train_x).argmax(1) == train_y).float().mean().item()
    return {"top1": acc, "train_top1": train_acc, "epochs": epochs, "lr": lr}


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200,
                            history_size: int = 100, linear_layout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's one L-BFGS probe fit: multinomial logistic regression from zero weights,
    minimising ``cross_entropy(x @ w + b, y) + l2 * |w|^2`` with L-BFGS (lr 1, strong-Wolfe line
    search, up to ``max_iter`` iterations, ``history_size`` correction pairs). Used by
    :func:`few_shot` and by ``train/evaluate.py``'s quick linear probe.

    Args:
        x: (N, D) float features (standardise them first); y: (N,) int64 class ids.
        num_classes: K.
        l2: weight decay on ``w`` (not on ``b``).
        max_iter, history_size: L-BFGS settings.
        linear_layout: optimise the weight as ``nn.Linear`` holds it, (K, D), instead of (D, K).
            The same fit, rounded differently (L-BFGS's dot products run over the flattened
            weight), so each caller keeps the layout its recorded results were made with:
            :func:`few_shot` this one, ``train/evaluate.py`` (D, K).

    Returns:
        w (D, K) and b (K,), detached.

    Example:
        >>> w, b = fit_logistic_regression(torch.randn(20, 4), torch.arange(20) % 2, 2, 1e-3)
        >>> w.shape, b.shape
        (torch.Size([4, 2]), torch.Size([2]))
    """
    D = x.shape[1]
    w = torch.zeros((num_classes, D) if linear_layout else (D, num_classes), requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=history_size,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = F.linear(x, w, b) if linear_layout else x @ w + b
        loss = F.cross_entropy(logits, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.t() if linear_layout else w).detach(), b.detach()


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3,
                        max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on standardised features (:func:`fit_logistic_regression`),
    as an ``nn.Linear``."""
    w, b = fit_logistic_regression(x, y, num_classes, l2, max_iter, linear_layout=True)
    clf = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.copy_(w.t())
        clf.bias.copy_(b)
    return clf


def few_shot(train_x, train_y, test_x, test_y, shots: Sequence[int] = (1, 5, 10), seeds: Sequence[int] = (0, 1, 2, 3, 4),
             l2: float = 1e-3) -> dict:
    """k-shot accuracy: for each seed draw k training images per class, fit a logistic regression
    on their standardised features, score the whole test set. Returns {k: {mean, std, runs}}."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    out = {}
    for k in shots:
        accs = []
        for s in seeds:
            g = torch.Generator().manual_seed(1000 * k + s)
            idx = []
            for c in range(num_classes):
                pool = (train_y == c).nonzero().view(-1)
                if len(pool) < k:
                    raise ValueError(f"class {c} has {len(pool)} training images, fewer than k={k}")
                idx.append(pool[torch.randperm(len(pool), generator=g)[:k]])
            idx = torch.cat(idx)
            mu, sd = train_x[idx].mean(0), train_x[idx].std(0, unbiased=False) + 1e-6
            with torch.enable_grad():
                clf = logistic_regression((train_x[idx] - mu) / sd, train_y[idx], num_classes, l2)
            with torch.no_grad():
                accs.append((clf((test_x - mu) / sd).argmax(1) == test_y).float().mean().item())
        t = torch.tensor(accs)
        out[k] = {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "runs": accs}
    return out


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay: Sequence[str] = ()) -> list[dict]:
    """Fine-tuning parameter groups with layer-wise lr decay: block i of n gets lr scale
    ``layer_decay ** (n - i)``; embeddings ``layer_decay ** (n + 1)``; everything after the
    blocks 1. No weight decay on 1-D tensors, biases and ``no_weight_decay`` names. The frozen
    tokenizer (``vqgan.*``) and the generative decoder are left out."""
    n = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(("vqgan.", "decoder", "mlm_layer", "mask_token")):
            continue
        if name.startswith(("token_emb.", "cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = n + 1
        decay = not (p.ndim == 1 or name.endswith(".bias") or name in no_weight_decay)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (n + 1 - layer), "layer": layer}
        groups[key]["params"].append(p)
    return list(groups.values())


class MAGEClassifier(nn.Module):
    """The official fine-tuning model: MAGE encoder on all tokens (no mask), global pool over the
    image tokens, ``fc_norm``, linear ``head``."""

    def __init__(self, mage, num_classes: int):
        super().__init__()
        self.mage = mage
        dim = mage.token_emb.word_embeddings.weight.shape[1]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        ids = self.mage._with_class_slot(self.mage.tokenize(imgs), self.mage.fake_class_label)
        h = self.mage.encode_ids(ids, final_norm=False)[:, 1:].mean(1)
        return self.head(self.fc_norm(h))


def finetune(classifier: MAGEClassifier, train_items, test_items, *, epochs: int = 1, batch_size: int = 32,
             blr: float = 5e-4, layer_decay: float = 0.75, weight_decay: float = 0.05, seed: int = 0,
             progress: bool = True) -> dict:
    """Fine-tune end to end (tokenizer frozen) with AdamW, layer-wise lr decay, label smoothing 0.1,
    warm-up then cosine; returns test top-1."""
    torch.manual_seed(seed)
    groups = param_groups_lrd(classifier.mage, weight_decay, layer_decay)
    n = len(classifier.mage.blocks)
    groups.append({"params": list(classifier.fc_norm.parameters()) + [classifier.head.bias], "weight_decay": 0.0,
                   "lr_scale": 1.0, "layer": n + 1})
    groups.append({"params": [classifier.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0, "layer": n + 1})
    lr = blr * batch_size / 256
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    dev = next(classifier.parameters()).device
    size = classifier.mage.img_size
    steps = epochs * math.ceil(len(train_items) / batch_size)
    warm = max(1, steps // 10)
    it = 0
    g = torch.Generator().manual_seed(seed)
    classifier.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="fine-tune")
    for _ in range(epochs):
        order = [train_items[i] for i in torch.randperm(len(train_items), generator=g).tolist()]
        for x, y in iterate_images(order, size, batch_size):
            cur = lr * (it + 1) / warm if it < warm else lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, steps - warm)))
            for grp in opt.param_groups:
                grp["lr"] = cur * grp["lr_scale"]
            loss = F.cross_entropy(classifier(x.to(dev)), y.to(dev), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar:
        bar.close()
    classifier.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in iterate_images(test_items, size, batch_size):
            correct += (classifier(x.to(dev)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return {"top1": correct / total, "epochs": epochs, "lr": lr, "layer_decay": layer_decay}


__all__ = ["extract_features", "linear_probe", "few_shot", "fit_logistic_regression", "logistic_regression",
           "param_groups_lrd", "LARS",
           "MAGEClassifier", "finetune", "probe_head", "list_image_folder"]
