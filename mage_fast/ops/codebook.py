"""Codebook nearest-neighbour lookup: the index of the closest code for every input vector.

Reference: the official VQGAN quantizer's arithmetic, ``|z|^2 + |e|^2 - 2 z.e`` then ``argmin``
(ties go to the lowest index, as ``torch.argmin``). The ``cosine`` metric l2-normalises both
sides first (ViT-VQGAN's factorised codes). Faster backends register on :data:`codebook_nn_op`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import Op

METRICS = ("l2", "cosine")


def codebook_nn_ref(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", upcast: bool = True) -> torch.Tensor:
    """Plain-torch nearest neighbour. z: (N, D), codebook: (K, D) -> (N,) int64.

    ``upcast`` computes in fp32 whatever the input dtype (the official path runs fp32 here).
    Materialises the (N, K) distance matrix: this is the oracle, not the fast path.
    """
    if upcast:
        z, codebook = z.float(), codebook.float()
    if metric == "cosine":
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
        return torch.argmax(z @ codebook.t(), dim=1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", z, codebook.t())
    return torch.argmin(d, dim=1)


codebook_nn_op = Op("codebook_nn", codebook_nn_ref)


def codebook_nn(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Index of the nearest codebook entry for each row of ``z``.

    Args:
        z: (N, D) float tensor (fp32, fp16 or bf16); accumulation is fp32 on every backend.
        codebook: (K, D) float tensor on the same device.
        metric: ``"l2"`` (squared Euclidean, the VQGAN quantizer) or ``"cosine"`` (both sides
            l2-normalised first, ViT-VQGAN).

    Returns:
        (N,) int64 indices in ``[0, K)``; ties resolve to the lowest index.

    Example:
        >>> idx = codebook_nn(torch.randn(10, 8), torch.randn(32, 8))
        >>> idx.shape
        torch.Size([10])
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"codebook_nn expects z (N, D) and codebook (K, D) with the same D; got "
                         f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"codebook_nn expects float tensors, got {z.dtype} and {codebook.dtype}")
    return codebook_nn_op(z, codebook, metric)
