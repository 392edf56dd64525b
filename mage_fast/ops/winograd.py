"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3), for the pixel decode on a CPU.

A 3x3 convolution (stride 1, zero padding 1) over 4x4 output tiles is 36 matrix products
(tiles x Cin) @ (Cin x Cout) between fixed linear transforms of the 6x6 input patches and of the
products (Lavin & Gray 2016): 36 multiplies per 16 outputs and channel pair instead of 144. The
compiled op (``csrc/cpu/winograd.cpp``) transforms cache-sized chunks of tiles in channels-last
fp32 and runs the 36 products through ``torch.bmm``; it also reads a nearest 2x upsampling of its
input in place (``upsample=True``), so the VQGAN decoder's "upsample, then convolve" never
materialises the upsampled tensor.

:func:`conv3x3` goes through the dispatcher (:data:`conv3x3_op`): the ``cpp`` backend
(``mage_fast.backends.cpp``) takes fp32 CPU input and says why it declines anything else; the
reference takes the rest. The backend keeps the transformed weight in the ``packed`` dict the
caller owns (:class:`WinogradConv2d` holds one), remade when the weight changes in place.

fp32 only: the transforms' coefficients (up to 8 and 1/24) make its rounding error about 10x
that of a direct fp32 convolution (measured ~1e-5 of the output's largest magnitude; tests/ops/
test_winograd_conv3x3.py). The reference is ``F.conv2d`` on the same weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import Op


def available() -> bool:
    """Whether the compiled op is loaded (``mage_fast._C``)."""
    from .. import _ext
    return _ext.has_op("winograd_conv3x3")


def conv3x3_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], upsample: bool,
                packed: Optional[dict] = None) -> torch.Tensor:
    """The plain-torch reference: nearest 2x upsampling when asked, then the padded 3x3 convolution
    (``packed``, a backend's cache, is not used)."""
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.conv2d(x, weight, bias, padding=1)


conv3x3_op = Op("winograd_conv3x3", conv3x3_ref)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], upsample: bool = False,
            packed: Optional[dict] = None) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1) of ``x``, or of its nearest 2x upsampling when
    ``upsample``, through the dispatcher (Winograd F(4x4, 3x3) on the ``cpp`` backend).

    Args:
        x: (N, Cin, H, W) float tensor.
        weight: (Cout, Cin, 3, 3); bias: (Cout,) or None.
        upsample: convolve the 2x nearest upsampling of ``x`` without materialising it.
        packed: a dict the caller keeps across calls, where a backend caches its transformed weight
            (remade when the weight changes); None transforms the weight on every call.

    Returns:
        (N, Cout, H, W), or (N, Cout, 2H, 2W) with ``upsample``.

    Example:
        >>> y = conv3x3(torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3), None, upsample=True)
        >>> y.shape
        torch.Size([1, 8, 12, 12])
    """
    return conv3x3_op(x, weight, bias, upsample, packed)


def _computable(conv: nn.Conv2d) -> bool:
    """Whether F(4x4, 3x3) computes ``conv``: 3x3, stride 1, zero padding 1, no dilation or groups."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def weight_key(w: torch.Tensor) -> tuple:
    """What identifies the weight's values: its storage and in-place version (an inference tensor,
    made under ``torch.inference_mode``, has no version counter: its storage alone)."""
    try:
        return (w.data_ptr(), w._version)
    except RuntimeError:
        return (w.data_ptr(), None)


class WinogradConv2d(nn.Module):
    """A frozen 3x3 / stride 1 / padding 1 convolution computed by F(4x4, 3x3) where it can be (fp32
    on the CPU, the compiled op loaded), else by :func:`conv3x3_ref`. ``forward(x, upsample=True)``
    convolves the nearest 2x upsampling of x without materialising it."""

    reads_upsampled = True  # the VQGAN decoder hands it the low-resolution input with upsample=True

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not _computable(conv):
            raise ValueError(f"WinogradConv2d takes a 3x3 convolution with stride 1, padding 1, no groups; got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._packed: dict = {}  # the backend's transformed weight, made on first use

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias, upsample, self._packed)


def winograd_convs(module: nn.Module, min_channels: int = 32) -> int:
    """Replace, in place, every 3x3 / stride 1 / padding 1 ``nn.Conv2d`` of ``module`` with at least
    ``min_channels`` input and output channels (below that the transforms cost more than they save)
    by a :class:`WinogradConv2d`. Returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Conv2d and _computable(child) and min(child.in_channels, child.out_channels) >= min_channels:
            setattr(module, name, WinogradConv2d(child))
            n += 1
        else:
            n += winograd_convs(child, min_channels)
    return n
