"""Public ops. Each has a plain-torch reference (the CPU fallback and test oracle) and optional
faster backends chosen per call by :mod:`mage_fast.ops.dispatch`."""
from .attention import attention, attention_official, attention_sdpa
from .codebook import codebook_nn, codebook_nn_ref
from .decode_step import decode_step, decode_step_ref, image_keys
from .dispatch import Op, force_backend
from .group_norm import group_norm_silu, group_norm_silu_ref
from .layer_norm import layer_norm, layer_norm_ref
from .mlm_head_loss import mlm_head_loss, mlm_head_loss_ref
from .mlm_loss import masked_ce, masked_ce_ref
from .token_drop import gather_tokens, keep_index, scatter_tokens
from .token_embed import token_embed, token_embed_ref
from .winograd import conv3x3, conv3x3_ref

__all__ = ["attention", "attention_official", "attention_sdpa", "codebook_nn", "codebook_nn_ref",
           "conv3x3", "conv3x3_ref", "decode_step", "decode_step_ref", "image_keys", "Op", "force_backend",
           "gather_tokens", "group_norm_silu", "group_norm_silu_ref",
           "keep_index", "layer_norm", "layer_norm_ref", "scatter_tokens", "masked_ce", "masked_ce_ref",
           "mlm_head_loss", "mlm_head_loss_ref", "token_embed", "token_embed_ref"]

from .. import backends as _backends  # noqa: E402  (registers optional backends on the ops above)

_backends.register_all()
