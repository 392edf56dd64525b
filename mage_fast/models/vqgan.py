"""The MaskGIT-architecture VQGAN that MAGE tokenizes with, under the official parameter names.

Convolutional encoder with average-pool downsampling and no attention, a vector quantizer over
``n_embed`` codes of dim ``embed_dim``, and a decoder with nearest x2 upsampling. Residual blocks
that change width add a 1x1 projection *of their own output* (MaskGIT's Flax code did so and the
released weights depend on it).

``grayscale=True`` (not in the official model; default off) keeps the 3-channel image interface but
works in one channel inside: the encoder reads the mean of the three input channels (its
``conv_in`` takes 1 channel) and the decoder's ``conv_out`` paints 1 channel that is repeated to
3, so a reconstruction or sample cannot drift in colour. Same parameter names; only those two
convolutions change shape.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.codebook import codebook_nn
from ..ops.dispatch import Op
from ..ops.group_norm import available as group_norm_silu_available
from ..ops.group_norm import norm_silu
from .checks import check_images, check_token_ids
from .state_dict import load_tokenizer

OFFICIAL_VQGAN_CONFIG = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                             embed_dim=256, n_embed=1024, in_channels=3, out_ch=3, resolution=256)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def _norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``. A plain GroupNorm on channels-last fp32 CPU input that records no gradient
    (the channels-last decode, :func:`decode_channels_last`) runs as the compiled GroupNorm + SiLU of
    :mod:`mage_fast.ops.group_norm` (closer to a float64 reference than torch's two ops); anything
    else as :func:`mage_fast.ops.group_norm.norm_silu`."""
    if (type(norm) is nn.GroupNorm and norm.affine and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == torch.float32 and norm.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
            and group_norm_silu_available()):
        return torch.ops.mage_fast.group_norm_silu(x, norm.num_groups, norm.weight.detach(), norm.bias.detach(),
                                                   norm.eps, True)
    return norm_silu(norm, x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (nn.Conv2d(out_channels, out_channels, 1, bias=False)
                             if in_channels != out_channels else None)

    def forward(self, x):
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(h)
        if not torch.is_grad_enabled() or not (h.requires_grad or skip.requires_grad):
            return h.add_(skip)  # h is this block's own fresh tensor: no new one (the same sums)
        return skip + h


class _Level(nn.Module):
    def __init__(self, blocks: Sequence[ResnetBlock], upsample_ch: Optional[int] = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample_ch is not None:
            self.upsample = nn.Module()
            self.upsample.conv = nn.Conv2d(upsample_ch, upsample_ch, 3, padding=1)


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, h):
        return self.block_2(self.block_1(h))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, in_channels=3, **_unused_official_keys):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        c = ch
        for m in ch_mult:
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
            self.down.append(_Level(blocks))
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, 2, 2)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, z_channels, out_ch=3, **_unused_official_keys):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            levels.insert(0, _Level(blocks, upsample_ch=c if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for blk in level.block:
                h = blk(h)
            if i != 0:
                conv = level.upsample.conv
                if getattr(conv, "reads_upsampled", False):  # a convolution that upsamples as it reads (ops.winograd)
                    h = conv(h, upsample=True)
                else:
                    h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(_norm_silu(self.norm_out, h))


def decode_reference(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder as the official code runs it: (B, z_channels, h, w) -> images, in ``z``'s layout."""
    return decoder(z)


def decode_channels_last(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """The same decoder on channels-last activations: torch's direct (oneDNN) convolutions, no
    Winograd, each plain GroupNorm + SiLU as one compiled op; images come back contiguous (NCHW).
    fp32 throughout; the convolutions sum in another order than on NCHW input, so pixels differ
    from :func:`decode_reference`'s by fp32 rounding (tests/ops/tolerances.py states the bound)."""
    with _reuse_freed_memory():
        return decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_LIBC = []  # [ctypes handle or None], looked up once


def _glibc():
    if not _LIBC:
        import ctypes
        import ctypes.util
        import platform
        lib = None
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt  # noqa: B018  (present in every glibc; checked, not assumed)
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


class _reuse_freed_memory:
    """During the decode, glibc's malloc keeps the activations it frees and hands them to the next
    ones, where by default each allocation above its mmap threshold (at most 32 MiB) is a fresh
    mapping that the kernel zero-fills page by page (a (4, 128, 256, 256) fp32 activation is 128
    MiB; the page faults were a sixth of the decode's CPU time). On exit the thresholds are set to
    32 MiB (mmap) and 64 MiB (trim), the values glibc's own adjustment rises to, so memory freed later
    goes back to the system as before; glibc's adjustment itself stays off from then on. Not glibc:
    nothing changes."""

    def __enter__(self):
        lib = _glibc()
        if lib is not None:
            lib.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            lib.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        return self

    def __exit__(self, *exc):
        lib = _glibc()
        if lib is not None:
            lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            lib.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _channels_last_supports(decoder, z) -> Optional[str]:
    if z.device.type != "cpu":
        return "not on the CPU"
    if z.dtype != torch.float32 or next(decoder.parameters()).dtype != torch.float32:
        return "not fp32"
    if torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in decoder.parameters())):
        return "records a gradient"
    if z.dim() != 4:
        return "not a (B, C, h, w) input"
    if not group_norm_silu_available():
        return "the compiled group_norm_silu op is not built"
    return None


decode_op = Op("vqgan_decode", decode_reference)
decode_op.register("channels_last", decode_channels_last, _channels_last_supports)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with the straight-through estimator (taming's legacy loss form:
    ``mean((zq.detach() - z)^2) + beta * mean((zq - z.detach())^2)``)."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        """z: (B, C, H, W) -> (z_q (B, C, H, W), loss, (None, None, indices (B*H*W,)))."""
        zp = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        idx = codebook_nn(zp.view(-1, self.e_dim), self.embedding.weight, "l2")  # (BHW,)
        z_q = self.embedding(idx).view(zp.shape)
        loss = torch.mean((z_q.detach() - zp) ** 2) + self.beta * torch.mean((z_q - zp.detach()) ** 2)
        z_q = zp + (z_q - zp).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, idx)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """indices: any shape of code ids; shape: (B, H, W, C) -> (B, C, H, W), or None -> rows."""
        check_token_ids(indices, self.n_e, "codebook indices")
        z_q = self.embedding(indices.long())
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VQModel(nn.Module):
    """The tokenizer: ``encode(x) -> (z_q, loss, (perplexity, min_encodings, indices))``,
    ``decode(z_q) -> images`` (not clamped), as the official ``VQModel``.

    ``perplexity`` and ``min_encodings`` are ``None``, as in the official release.
    """

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, embed_dim=256,
                 n_embed=1024, in_channels=3, out_ch=3, resolution=256, ckpt_path: Optional[str] = None,
                 grayscale: bool = False, **official_extras):
        super().__init__()
        unknown = set(official_extras) - {"double_z", "attn_resolutions", "dropout"}
        if unknown:
            raise TypeError(f"unknown VQGAN config keys {sorted(unknown)}")
        if official_extras.get("double_z"):
            raise ValueError("double_z=True is a KL autoencoder setting; the MAGE tokenizer has double_z=False")
        if embed_dim != z_channels:
            raise ValueError(f"embed_dim ({embed_dim}) must equal z_channels ({z_channels}): the MaskGIT "
                             f"VQGAN quantizes the encoder output directly")
        if not isinstance(grayscale, bool):
            raise TypeError(f"grayscale must be True or False, got {grayscale!r}")
        cfg = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.config = dict(cfg, embed_dim=embed_dim, n_embed=n_embed, in_channels=in_channels, out_ch=out_ch,
                           resolution=resolution)
        if grayscale:  # only recorded when on: official and older configs stay as they were
            self.config["grayscale"] = True
        self.grayscale = grayscale
        self.resolution = resolution
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels=1 if grayscale else in_channels, **cfg)
        self.decoder = Decoder(out_ch=1 if grayscale else out_ch, **cfg)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25)
        self.check_input_range = True
        if ckpt_path is not None:
            import os
            if not os.path.isfile(ckpt_path):
                raise FileNotFoundError(
                    f"tokenizer checkpoint {ckpt_path!r} not found. Pass vqgan_ckpt_path=None to build without "
                    f"loading (a full MAGE checkpoint loaded afterwards includes the tokenizer).")
            load_tokenizer(self, ckpt_path)

    @property
    def n_embed(self) -> int:
        return self.quantize.n_e

    def encode(self, x: torch.Tensor):
        return self.quantize(self.pre_quant(x))

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> encoder output (B, embed_dim, H/f, W/f), what ``quantize`` takes."""
        check_images(x, None, check_range=self.check_input_range, channels=self.config["in_channels"])
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"image height and width must be multiples of {self.downsample}, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        if self.grayscale:
            x = x.mean(dim=1, keepdim=True)
        return self.encoder(x)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) quantized codes -> images (B, out_ch, h*f, w*f). At inference on a CPU in
        fp32 the decoder runs channels-last (:func:`decode_channels_last`); ``force_backend("torch")``
        (op ``vqgan_decode``) runs it as the official code does."""
        out = decode_op(self.decoder, quant)
        if self.grayscale:  # one painted channel, shown as out_ch identical ones
            out = out.repeat(1, self.config["out_ch"], 1, 1)
        return out

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, h, w) ids -> images (B, out_ch, h*f, w*f)."""
        B, h, w = codes.shape
        return self.decode(self.quantize.get_codebook_entry(codes.reshape(-1), (B, h, w, self.quantize.e_dim)))

    def forward(self, x):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff
