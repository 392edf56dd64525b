"""Backend ``"cpp"``: the compiled ops of ``mage_fast._C`` (C++ CPU kernels; CUDA kernels in CUDA builds).

The ops live in ``torch.ops.mage_fast`` (schemas in csrc/ops.cpp). This module gives them fake
implementations (so torch.compile can trace them), autograd formulas for the two differentiable
ones (gather/scatter of tokens), and registers them (the CPU-only GroupNorm + SiLU and Winograd
convolution among them) on the dispatcher with a ``supports`` that says why a call is declined:
extension not built, wrong device, unsupported dtype, a call that needs gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from ..ops.codebook import codebook_nn_op
from ..ops.decode_step import decode_step_op
from ..ops.group_norm import group_norm_silu_op
from ..ops.token_drop import gather_tokens_op, scatter_tokens_op
from ..ops.winograd import conv3x3_op, weight_key

NAME = "cpp"
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_C = _ext.load()


def _device_reason(op: str, *tensors: torch.Tensor, cuda: bool) -> Optional[str]:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return f"tensors on different devices ({', '.join(str(t.device) for t in tensors)})"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not cuda:
            return f"no CUDA kernel for {op} (CPU only)"
        if not _ext.with_cuda():
            return "extension built without CUDA"
        return None
    return f"device {dev.type} not supported"


def _base_reason() -> Optional[str]:
    return None if _C is not None else f"extension unavailable: {_ext.status}"


def _codebook_nn_supports(z, codebook, metric="l2") -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if z.dtype not in _FLOAT or codebook.dtype not in _FLOAT:
        return f"dtype {z.dtype}/{codebook.dtype} not supported (float32, float16, bfloat16)"
    if metric not in ("l2", "cosine"):
        return f"metric {metric!r} not supported"
    if codebook.shape[0] == 0:
        return "empty codebook"
    return _device_reason("codebook_nn", z, codebook, cuda=True)


def _decode_step_supports(logits, ids, key, step, mask_len, noise_scale, mask_id) -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if logits.dtype not in _FLOAT:
        return f"logits dtype {logits.dtype} not supported (float32, float16, bfloat16)"
    if ids.dtype != torch.int64 or key.dtype != torch.int64:
        return f"ids/key must be int64, got {ids.dtype}/{key.dtype}"
    if logits.shape[-1] == 0:
        return "no classes"
    return _device_reason("decode_step", logits, ids, key, cuda=True)


def _gather_supports(x, index) -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if x.dim() != 3 or index.dim() != 2 or index.dtype != torch.int64:
        return f"expects x (B, L, D) and int64 index (B, K), got {tuple(x.shape)} and {index.dtype} {tuple(index.shape)}"
    if x.is_complex() or x.dtype == torch.bool and x.requires_grad:
        return f"dtype {x.dtype} not supported"
    return _device_reason("gather_tokens", x, index, cuda=False)


def _scatter_supports(x, index, all_mask, pos_embed) -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if x.dtype != torch.float32 or pos_embed.dtype != torch.float32:
        return f"float32 x and pos_embed only, got {x.dtype} and {pos_embed.dtype}"
    if index.dtype != torch.int64 or all_mask.dtype != torch.bool:
        return f"index must be int64 and all_mask bool, got {index.dtype} and {all_mask.dtype}"
    if x.dim() != 3 or pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or x.shape[1] == 0:
        return f"expects x (B, K>=1, D) and pos_embed (1, L, D), got {tuple(x.shape)} and {tuple(pos_embed.shape)}"
    return _device_reason("scatter_tokens", x, index, all_mask, pos_embed, cuda=False)


def _group_norm_silu_supports(x, groups, weight, bias, eps) -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if not _ext.has_op("group_norm_silu"):
        return "extension built without group_norm_silu (rebuild it)"
    if x.dim() != 4:
        return f"expects 4-D x (N, C, H, W), got {x.dim()}-D"
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return f"float32 only, got x {x.dtype}, weight {weight.dtype}, bias {bias.dtype}"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return "no backward: a call that needs gradients goes to the reference"
    return _device_reason("group_norm_silu", x, weight, bias, cuda=False)


def _conv3x3_supports(x, weight, bias, upsample, packed=None) -> Optional[str]:
    if (r := _base_reason()) is not None:
        return r
    if not (_ext.has_op("winograd_conv3x3") and _ext.has_op("winograd_weight")):
        return "extension built without winograd_conv3x3 (rebuild it)"
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"float32 only, got x {x.dtype} and weight {weight.dtype}"
    return _device_reason("winograd_conv3x3", x, weight, *([] if bias is None else [bias]), cuda=False)


def _codebook_nn(z, codebook, metric="l2"):
    return torch.ops.mage_fast.codebook_nn(z.detach(), codebook.detach(), metric)


def _decode_step(logits, ids, key, step, mask_len, noise_scale, mask_id):
    return torch.ops.mage_fast.decode_step(logits.detach(), ids, key, int(step), int(mask_len), float(noise_scale),
                                           int(mask_id))


def _gather(x, index):
    return torch.ops.mage_fast.gather_tokens(x, index)


def _scatter(x, index, all_mask, pos_embed):
    return torch.ops.mage_fast.scatter_tokens(x, index, all_mask, pos_embed)


def _group_norm_silu(x, groups, weight, bias, eps):
    return torch.ops.mage_fast.group_norm_silu(x, groups, weight.detach(), bias.detach(), eps, True)


def _conv3x3(x, weight, bias, upsample, packed=None):
    """Winograd F(4x4, 3x3); the transformed weight (36, Cin, Cout) is kept in ``packed`` under this
    backend's name and remade when the weight's values change."""
    key = weight_key(weight)
    cached = packed.get(NAME) if packed is not None else None
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mage_fast.winograd_weight(weight.detach()))
        if packed is not None:
            packed[NAME] = cached
    return torch.ops.mage_fast.winograd_conv3x3(x, cached[1], None if bias is None else bias.detach(), upsample)


def _register_library() -> None:
    lib = "mage_fast::"

    @torch.library.register_fake(lib + "codebook_nn")
    def _(z, codebook, metric):
        return z.new_empty((z.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(lib + "decode_step")
    def _(logits, ids, key, step, mask_len, noise_scale, mask_id):
        return ids.new_empty(ids.shape), ids.new_empty(ids.shape)

    @torch.library.register_fake(lib + "gather_tokens")
    def _(x, index):
        return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))

    @torch.library.register_fake(lib + "scatter_tokens")
    def _(x, index, all_mask, pos_embed):
        return x.new_empty((x.shape[0], all_mask.shape[1], x.shape[2]))

    def gather_setup(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape

    def gather_backward(ctx, grad):  # grad: (B, K, D) -> (B, L, D), summed where an index repeats
        (index,) = ctx.saved_tensors
        gx = grad.new_zeros(ctx.x_shape)
        return gx.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, grad.shape[-1]), grad), None

    torch.library.register_autograd(lib + "gather_tokens", gather_backward, setup_context=gather_setup)

    def scatter_setup(ctx, inputs, output):
        x, index, all_mask, pos_embed = inputs
        ctx.save_for_backward(index, all_mask)

    def scatter_backward(ctx, grad):  # grad: (B, L, D)
        index, all_mask = ctx.saved_tensors
        D = grad.shape[-1]
        kept = ~all_mask.gather(1, index)  # (B, K) slots that land on an unmasked position
        covered = torch.zeros_like(all_mask).scatter_(1, index, kept)  # (B, L) positions fed by a slot
        gx = grad.gather(1, index.unsqueeze(-1).expand(-1, -1, D)) * kept.unsqueeze(-1)  # (B, K, D)
        fill = (grad * (~covered).unsqueeze(-1)).sum(1)  # (B, D) every position fed by the class slot
        gx = torch.cat([gx[:, :1] + fill.unsqueeze(1), gx[:, 1:]], dim=1)
        return gx, None, None, grad.sum(0, keepdim=True)

    torch.library.register_autograd(lib + "scatter_tokens", scatter_backward, setup_context=scatter_setup)


if _C is not None:
    _register_library()

codebook_nn_op.register(NAME, _codebook_nn, _codebook_nn_supports)
decode_step_op.register(NAME, _decode_step, _decode_step_supports)
gather_tokens_op.register(NAME, _gather, _gather_supports)
scatter_tokens_op.register(NAME, _scatter, _scatter_supports)
group_norm_silu_op.register(NAME, _group_norm_silu, _group_norm_silu_supports)
conv3x3_op.register(NAME, _conv3x3, _conv3x3_supports)
