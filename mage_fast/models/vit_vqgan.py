"""ViT-VQGAN (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN").

A ViT encoder over non-overlapping p x p patches, a factorised projection of each patch feature
to a low-dimensional code space (8 or 32), l2-normalised codes and inputs matched by cosine
nearest neighbour (:func:`mage_fast.ops.codebook_nn` with ``metric="cosine"``), the
straight-through estimator with codebook and commitment losses, and a ViT decoder that projects
the codes back up and un-patchifies to pixels. The transformer stacks end in the paper's
two-layer feed-forward head with a tanh in the middle; no activation at either output.

It offers the ``VQModel`` interface, so :class:`mage_fast.MAGE` takes it as ``tokenizer=``:
``encode(x) -> (z_q, loss, (None, None, indices))``, ``decode(z_q)``,
``quantize.get_codebook_entry(indices, shape=(B, h, w, C))``, ``quantize.e_dim``, ``n_embed``,
``downsample``, ``resolution``, ``check_input_range`` and ``config``.

Images come in [0, 1] (as the MaskGIT VQGAN takes them); they are mapped to [-1, 1] inside and
the decoder's output is mapped back, not clamped.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.transformer import Block
from ..ops.codebook import codebook_nn
from .checks import check_images, check_token_ids


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``).

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patches row-major, each patch (p, p, C) flattened."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


class _TanhHead(nn.Module):
    """The paper's output head of each transformer stack: Linear -> tanh -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ViTStack(nn.Module):
    """Token projection (none if ``in_dim`` is None) + learned position embedding -> pre-norm ViT
    blocks -> LayerNorm -> tanh head."""

    def __init__(self, num_tokens: int, in_dim: Optional[int], dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, out_dim: int):
        super().__init__()
        self.proj_in = nn.Identity() if in_dim is None else nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True,
                                           norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = _TanhHead(dim, int(dim * mlp_ratio), out_dim)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, in_dim) -> (B, N, out_dim)."""
        h = self.proj_in(x) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


class CosineQuantizer(nn.Module):
    """Factorised, l2-normalised vector quantizer.

    Inputs (already projected to ``e_dim``) and codes are l2-normalised; the nearest code in angle
    is found by :func:`codebook_nn` with ``metric="cosine"``. The loss is the VQ-VAE pair on the
    normalised vectors: ``mean((sg[z] - e)^2) + beta * mean((z - sg[e])^2)`` (codebook loss plus
    commitment loss), and the output uses the straight-through estimator ``z + sg[e - z]``.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        if n_e < 1 or e_dim < 1:
            raise ValueError(f"need n_e >= 1 and e_dim >= 1, got {n_e}, {e_dim}")
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.normal_(self.embedding.weight)

    def codes(self) -> torch.Tensor:
        """(n_e, e_dim) l2-normalised codebook."""
        return F.normalize(self.embedding.weight, dim=1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, e_dim) -> (N,) int64 index of the code nearest in angle (ties: lowest index)."""
        # precision raised: the lookup runs in fp32 (under autocast z may arrive in bf16)
        return codebook_nn(z.float(), self.embedding.weight.float(), metric="cosine")

    def forward(self, z: torch.Tensor):
        """z: (B, e_dim, h, w) projected encoder output -> (z_q (B, e_dim, h, w) straight-through,
        loss (scalar), (None, None, indices (B*h*w,) int64, row-major))."""
        B, C, h, w = z.shape
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, C), dim=1)  # (B*h*w, C)
        idx = self.lookup(zf)
        e = self.codes()[idx]  # (B*h*w, C)
        loss = torch.mean((zf.detach() - e) ** 2) + self.beta * torch.mean((zf - e.detach()) ** 2)
        z_q = zf + (e - zf).detach()
        return z_q.view(B, h, w, C).permute(0, 3, 1, 2).contiguous(), loss, (None, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """Normalised codes for ``indices`` (any shape): with ``shape=(B, h, w, C)`` -> (B, C, h, w),
        with ``None`` -> (*indices.shape, C). Raises ``ValueError`` for ids outside ``[0, n_e)``."""
        check_token_ids(indices, self.n_e, "codebook indices")
        e = F.embedding(indices.long(), self.codes())
        if shape is not None:
            e = e.reshape(shape).permute(0, 3, 1, 2).contiguous()
        return e


class ViTVQGAN(nn.Module):
    """ViT-VQGAN tokenizer with the ``VQModel`` interface.

    Args:
        img_size: square image side S (a multiple of ``patch_size``); default 256.
        patch_size: p, the side of the non-overlapping patches, and the downsampling factor
            (token grid S/p x S/p); default 8 (the paper's).
        in_channels: image channels; default 3.
        embed_dim, depth, num_heads, mlp_ratio: encoder transformer.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder transformer (default: as encoder).
        n_embed: codebook size K; default 8192 (the paper's).
        code_dim: dimension of the factorised code space (8 or 32 in the paper); default 32.
        beta: commitment weight; default 0.25.

    Example:
        >>> vq = ViTVQGAN(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, n_embed=64, code_dim=8)
        >>> z_q, vq_loss, (_, _, idx) = vq.encode(torch.rand(2, 3, 32, 32))
        >>> z_q.shape, idx.shape, vq.decode(z_q).shape
        (torch.Size([2, 8, 4, 4]), torch.Size([32]), torch.Size([2, 3, 32, 32]))
    """

    def __init__(self, img_size: int = 256, patch_size: int = 8, in_channels: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 decoder_embed_dim: Optional[int] = None, decoder_depth: Optional[int] = None,
                 decoder_num_heads: Optional[int] = None, n_embed: int = 8192, code_dim: int = 32,
                 beta: float = 0.25):
        super().__init__()
        if patch_size < 1 or img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of patch_size ({patch_size})")
        dec_dim = decoder_embed_dim or embed_dim
        dec_depth = depth if decoder_depth is None else decoder_depth
        dec_heads = decoder_num_heads or num_heads
        self.config = dict(img_size=img_size, patch_size=patch_size, in_channels=in_channels, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, decoder_embed_dim=dec_dim,
                           decoder_depth=dec_depth, decoder_num_heads=dec_heads, n_embed=n_embed,
                           code_dim=code_dim, beta=beta)
        self.resolution = img_size
        self.patch_size = self.downsample = patch_size
        self.grid = img_size // patch_size
        self.in_channels = in_channels
        n, pix = self.grid ** 2, patch_size * patch_size * in_channels
        self.encoder = ViTStack(n, pix, embed_dim, depth, num_heads, mlp_ratio, out_dim=embed_dim)
        self.quant_proj = nn.Linear(embed_dim, code_dim)  # factorised codes: down to the lookup space
        self.quantize = CosineQuantizer(n_embed, code_dim, beta)
        self.post_quant_proj = nn.Linear(code_dim, dec_dim)  # and back up for the decoder
        self.decoder = ViTStack(n, None, dec_dim, dec_depth, dec_heads, mlp_ratio, out_dim=pix)
        self.check_input_range = True
        self._init_linear()

    def _init_linear(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def n_embed(self) -> int:
        return self.quantize.n_e

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight (for an adaptive GAN-loss weight from gradient norms)."""
        return self.decoder.head.fc2.weight

    def encode(self, x: torch.Tensor):
        """Images (B, C, S, S) in [0, 1] -> ``(z_q, vq_loss, (None, None, indices))``.

        ``z_q`` (B, code_dim, S/p, S/p) is the straight-through quantized latent (its value the
        normalised codes, its gradient flows to the encoder); ``indices`` (B*(S/p)^2,) int64
        row-major. Raises ``ValueError`` for another image size, channel count or value range.
        """
        return self.quantize(self.pre_quant(x))

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> projected encoder output (B, code_dim, S/p, S/p), not yet
        normalised or quantized (what ``quantize`` takes; trainers read it for codebook restarts)."""
        check_images(x, self.resolution, check_range=self.check_input_range, channels=self.in_channels)
        h = self.encoder(patchify(x * 2.0 - 1.0, self.patch_size))  # (B, N, D)
        z = self.quant_proj(h)  # (B, N, code_dim)
        return z.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant: (B, code_dim, S/p, S/p) -> images (B, C, S, S) on the [0, 1] scale, not clamped."""
        B, C, h, w = quant.shape
        if (C, h, w) != (self.quantize.e_dim, self.grid, self.grid):
            raise ValueError(f"expected latents (B, {self.quantize.e_dim}, {self.grid}, {self.grid}), got "
                             f"{tuple(quant.shape)}")
        y = self.decoder(self.post_quant_proj(quant.flatten(2).transpose(1, 2)))  # (B, N, p*p*C)
        return (unpatchify(y, self.patch_size, h, w, self.in_channels) + 1.0) * 0.5

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, S/p, S/p) or (B, (S/p)^2) ids -> images (B, C, S, S)."""
        B = codes.shape[0]
        g = self.grid
        return self.decode(self.quantize.get_codebook_entry(codes.reshape(-1), (B, g, g, self.quantize.e_dim)))

    def forward(self, x: torch.Tensor):
        """Training forward: images -> (reconstruction (B, C, S, S), vq_loss)."""
        quant, vq_loss, _ = self.encode(x)
        return self.decode(quant), vq_loss


def vit_vqgan_loss(x: torch.Tensor, x_rec: torch.Tensor, vq_loss: torch.Tensor, *, l1_weight: float = 0.0,
                   l2_weight: float = 1.0, vq_weight: float = 1.0,
                   perceptual: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                   perceptual_weight: float = 0.1, logits_fake: Optional[torch.Tensor] = None,
                   gan_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The tokenizer's generator-side training loss, term by term.

    ``l1_weight * |x - x_rec| + l2_weight * (x - x_rec)^2 + vq_weight * vq_loss`` (means over
    elements), plus two optional terms whose networks the trainer supplies:

    - ``perceptual(x, x_rec) -> scalar`` (e.g. LPIPS from weights available offline), times
      ``perceptual_weight`` (paper 0.1);
    - ``logits_fake``: a discriminator's logits on ``x_rec``; adds the non-saturating generator
      loss ``softplus(-logits_fake).mean()`` times ``gan_weight`` (paper 0.1, StyleGAN
      discriminator). The discriminator's own loss is :func:`discriminator_loss`.

    Args:
        x, x_rec: (B, C, S, S) images and reconstructions on the same scale.
        vq_loss: the scalar codebook + commitment loss from ``encode``.

    Returns:
        (total scalar, dict of the detached terms).

    Example:
        >>> rec, vq_loss = vq(imgs)                      # doctest: +SKIP
        >>> loss, parts = vit_vqgan_loss(imgs, rec, vq_loss)  # doctest: +SKIP
    """
    if x.shape != x_rec.shape:
        raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(x_rec.shape)} differ in shape")
    parts = {"vq": vq_loss}
    total = vq_weight * vq_loss
    if l1_weight:
        parts["l1"] = (x - x_rec).abs().mean()
        total = total + l1_weight * parts["l1"]
    if l2_weight:
        parts["l2"] = ((x - x_rec) ** 2).mean()
        total = total + l2_weight * parts["l2"]
    if perceptual is not None:
        parts["perceptual"] = perceptual(x, x_rec)
        total = total + perceptual_weight * parts["perceptual"]
    if logits_fake is not None:
        parts["gan"] = F.softplus(-logits_fake.float()).mean()
        total = total + gan_weight * parts["gan"]
    return total, {k: v.detach() for k, v in parts.items()}


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss ``softplus(-D(x)) + softplus(D(x_rec))`` (means).

    Example:
        >>> float(discriminator_loss(torch.full((2,), 50.0), torch.full((2,), -50.0))) < 1e-6
        True
    """
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def vit_vqgan_tiny(img_size: int = 256, patch_size: int = 16, **kwargs) -> ViTVQGAN:
    """A CPU-test-sized ViT-VQGAN (width 64, 2+2 blocks, 1024 codes of dim 32)."""
    cfg = dict(embed_dim=64, depth=2, num_heads=4, n_embed=1024, code_dim=32)
    cfg.update(kwargs)
    return ViTVQGAN(img_size=img_size, patch_size=patch_size, **cfg)


def vit_vqgan_small(img_size: int = 256, patch_size: int = 8, **kwargs) -> ViTVQGAN:
    """The paper's Small: 8 blocks, 8 heads, width 512, MLP 2048, 8192 codes."""
    cfg = dict(embed_dim=512, depth=8, num_heads=8, n_embed=8192, code_dim=32)
    cfg.update(kwargs)
    return ViTVQGAN(img_size=img_size, patch_size=patch_size, **cfg)


def vit_vqgan_base(img_size: int = 256, patch_size: int = 8, **kwargs) -> ViTVQGAN:
    """The paper's Base: 12 blocks, 12 heads, width 768, MLP 3072, 8192 codes."""
    cfg = dict(embed_dim=768, depth=12, num_heads=12, n_embed=8192, code_dim=32)
    cfg.update(kwargs)
    return ViTVQGAN(img_size=img_size, patch_size=patch_size, **cfg)
