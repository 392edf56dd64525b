"""The transformer's linear layers at inference on a CPU: MKL's packed fp32 matrix product.

``linear(x, weight, bias)`` is ``F.linear`` (the plain-torch reference, :func:`linear_ref`). The
``mkl_packed`` backend multiplies by a copy of ``weight`` that MKL has laid out once for its own
kernel (``torch.ops.mkl._mkl_reorder_linear_weight``, the form torch's inductor freezes CPU weights
into) instead of re-packing the weight on every call, as ``addmm`` does. The packed product runs the
same fp32 kernel in the same summation order: on the shapes of the ViT passes (rows = batch x tokens,
128 or more) its outputs equal ``F.linear``'s bit for bit (tested); with fewer rows ``F.linear``
takes a matrix-vector path that rounds differently, so the backend declines those.

The backend takes only calls that record no gradient (inference; training keeps ``F.linear``), on
fp32 CPU tensors, where torch was built with MKL. The packed copy is cached per weight tensor for one
row count (the sampler's passes share it) and rebuilt when the weight changes in place or the row
count changes; it costs one more copy of each linear weight in memory while the model lives.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Op

MIN_ROWS = 128  # below this F.linear may take a matrix-vector path that rounds differently


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The plain-torch reference: ``F.linear``."""
    return F.linear(x, weight, bias)


linear_op = Op("linear", linear_ref)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on the first backend that accepts the call (see the module docstring)."""
    return linear_op(x, weight, bias)


def mkl_packed_available() -> bool:
    return bool(getattr(torch._C, "has_mkl", False)) and hasattr(torch.ops.mkl, "_mkl_linear") \
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


# id(weight tensor) -> (weak reference to it, (version counter, data pointer, row count), packed copy);
# an entry goes when its weight is freed
_PACKED: dict = {}


def _forget(ref, key: int) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        del _PACKED[key]


def packed_weight(weight: torch.Tensor, rows: int):
    """MKL's packed copy of ``weight`` for products with ``rows`` rows, cached (see the module docstring)."""
    state = (weight._version, weight.data_ptr(), rows)
    hit = _PACKED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == state:
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    key = id(weight)
    _PACKED[key] = (weakref.ref(weight, lambda r, k=key: _forget(r, k)), state, packed)
    return packed


def _mkl_packed_supports(x, weight, bias=None) -> Optional[str]:
    if not mkl_packed_available():
        return "torch was built without MKL's packed linear"
    if torch.compiler.is_compiling():
        return "under torch.compile (the traced graph keeps F.linear; inductor packs weights itself)"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "records a gradient (training keeps F.linear)"
    plain = (torch.Tensor, torch.nn.Parameter)
    if type(x) not in plain or type(weight) not in plain or (bias is not None and type(bias) not in plain):
        return "a tensor subclass (e.g. a quantized weight)"
    if x.layout != torch.strided or weight.layout != torch.strided:
        return "not a strided tensor"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return "not on the CPU"
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        return "not fp32"
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        return "not a linear layer's shapes"
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < MIN_ROWS:
        return f"{rows} rows (fewer than {MIN_ROWS})"
    return None


def _mkl_packed(x, weight, bias=None):
    rows = x.numel() // x.shape[-1]
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed_weight(weight, rows), weight.detach(),
                                     None if bias is None else bias.detach(), rows)


linear_op.register("mkl_packed", _mkl_packed, _mkl_packed_supports)
