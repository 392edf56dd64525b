"""Training objective of the tokenizers (the MaskGIT-architecture VQGAN and the ViT-VQGAN):
reconstruction (L2 + L1), codebook and commitment losses (the quantizer's), an optional patch-GAN
with hinge loss, codebook-usage counting and dead-code restarts that work under every ZeRO stage."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..models.vit_vqgan import CosineQuantizer, vit_vqgan_loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) discriminator: 4x4 stride-2 convs, GroupNorm, LeakyReLU(0.2) -> (B, 1, h, w)."""

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, n_layers):
            c2 = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c2, 4, 2, 1, bias=False), nn.GroupNorm(min(32, c2 // 4), c2), nn.LeakyReLU(0.2)]
            c = c2
        layers += [nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.GroupNorm(min(32, c // 4), c), nn.LeakyReLU(0.2),
                   nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x * 2 - 1)


class VQGANObjective(nn.Module):
    """``forward(imgs) -> (loss, stats, rec)`` for a tokenizer; stats are detached scalar tensors.

    Args:
        vq: the tokenizer to train: a :class:`mage_fast.models.vqgan.VQModel` or a
            :class:`mage_fast.models.vit_vqgan.ViTVQGAN` (anything with ``pre_quant``,
            ``quantize`` and ``decode``).
        l1_weight: weight of the L1 term beside the L2 (MSE) reconstruction loss.
        codebook_weight: weight of the quantizer loss (codebook + beta x commitment).

    The loss is :func:`mage_fast.models.vit_vqgan.vit_vqgan_loss` (L2 + L1 + quantizer loss) for
    both architectures, plus ``adv_weight`` x the hinge generator loss when an ``adversary`` is given.
    """

    def __init__(self, vq: nn.Module, l1_weight: float = 0.0, codebook_weight: float = 1.0):
        super().__init__()
        self.vq = vq
        self.l1_weight, self.codebook_weight = l1_weight, codebook_weight
        # a cosine quantizer matches normalised vectors: restart codes on normalised encoder outputs
        self.normalise_restarts = isinstance(vq.quantize, CosineQuantizer)
        self.register_buffer("usage", torch.zeros(vq.n_embed, dtype=torch.float32), persistent=False)
        self.last_z: Optional[torch.Tensor] = None

    def forward(self, imgs: torch.Tensor, adversary: Optional[nn.Module] = None, adv_weight: float = 0.0):
        imgs = imgs.to(next(self.vq.parameters()).dtype)
        z = self.vq.pre_quant(imgs)  # (B, C, h, w), the quantizer's input
        z_q, q_loss, (_, _, idx) = self.vq.quantize(z)
        rec = self.vq.decode(z_q)
        loss, parts = vit_vqgan_loss(imgs.float(), rec.float(), q_loss.float(), l1_weight=self.l1_weight,
                                     l2_weight=1.0, vq_weight=self.codebook_weight)
        stats = {"recon_mse": parts["l2"], "quant_loss": parts["vq"]}
        if "l1" in parts:
            stats["recon_l1"] = parts["l1"]
        if adversary is not None and adv_weight > 0:
            g_loss = -adversary(rec).float().mean()
            loss = loss + adv_weight * g_loss
            stats["g_loss"] = g_loss.detach()
        with torch.no_grad():
            self.usage += torch.bincount(idx, minlength=self.usage.numel()).float()
            zf = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            self.last_z = F.normalize(zf.float(), dim=1) if self.normalise_restarts else zf
        stats["loss"] = loss.detach()
        return loss, stats, rec.detach()

    @torch.no_grad()
    def codebook_report(self) -> dict:
        """Usage since the last reset, summed over ranks: used codes and perplexity."""
        usage = self.usage.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(usage)
        p = usage / usage.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        return {"codes_used": int((usage > 0).sum()), "perplexity": float(perplexity), "_usage": usage}

    @torch.no_grad()
    def restart_dead_codes(self, usage: torch.Tensor, min_count: float = 1.0, noise: float = 0.01) -> int:
        """Codes used fewer than ``min_count`` times since the last reset are moved onto encoder
        outputs of rank 0's last batch (plus small noise), identically on every rank; for a cosine
        quantizer onto the l2-normalised projected outputs. Resets the counts; returns how many
        codes were restarted."""
        dead = (usage < min_count).nonzero().view(-1)
        n = int(dead.numel())
        self.usage.zero_()
        if n == 0 or self.last_z is None:
            return 0
        z = self.last_z.float()
        pick = z[torch.randint(0, z.shape[0], (n,), device=z.device)]
        pick = pick + noise * pick.std() * torch.randn_like(pick)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(pick, src=0)
        weight = self.vq.quantize.embedding.weight
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        full = safe_get_full_fp32_param(weight)
        if full is None:  # no ZeRO partitioning: the parameter is the master copy
            weight.data[dead] = pick.to(weight.dtype)
        else:
            full = full.clone()
            full[dead] = pick.to(full.dtype)
            safe_set_full_fp32_param(weight, full)
        return n
